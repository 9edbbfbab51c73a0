"""Per-sample pruning records: one JSON line per evaluated sample, with its FLOPs.

The `llava` model calls `record(stats, config=self.config)` once per multimodal prefill (from its
`on_pruning_stats` hook). `stats` is the list of per-sample dicts of `model.pruning_stats`:

    method, layer, ratio            what ran (method/layer None when pruning is off)
    order, recipe                   the kept-token order and FitPrune's recipe file (None when off / unused)
    visual_tokens_before/after      visual tokens of the sample, before and after pruning
    seq_len_before/after            the sample's whole sequence length (system + text + visual)
    text_tokens                     its non-visual tokens
    select_ms, prefill_ms           selection time and prefill latency
    distance, objective             per image, the kept tokens' distance to all its tokens and the
    distance_kind, distance_ms      paper's Eq. 4 objective (`otprune.distance`, OTPRUNE_DISTANCE),
                                    and the time they took (apart from select_ms / prefill_ms)
    tokens_per_layer (optional)     tokens processed by each decoder layer, for multi-layer
                                    schedules (FastV, VTW, FitPrune recipes); when absent it is
                                    seq_len_before for the layers < `layer`, seq_len_after after

Each line holds those fields; `gamma`, `seed`, `order` and `recipe` (the stats' own, else those of
the `PruneConfig` that ran: `prune=`, or the environment's when it is the setting the stats report;
None for a setting the method does not use, see `result_settings`); the decoder sizes
(`hidden_size`, `intermediate_size`, `num_layers`, from `config` or given explicitly), the schedule
`tokens_per_layer`, and `tflops` / `tflops_unpruned` from the paper's formula (`otprune.flops`) on
the actual lengths, plus the lmms-eval context (output path, tasks, model args, limit) and `time`,
`run` (this process), `run_id` (`OTPRUNE_RUN_ID`: the lmms-eval call run_OTPrune.sh made, also in
its folder name; None outside it), `rank`.

Where the lines go (`OTPRUNE_RECORDS`, read by `otprune.config.records_target`):

- unset: when the process runs lmms-eval with `--output_path OUT --model_args pretrained=P,...`,
  `OUT/<sanitized P>/otprune_records_<date>_<time>_r<rank>_<pid>.jsonl` -- the folder where
  lmms-eval 0.7 writes `<date>_results.json` and `<date>_samples_<task>.jsonl`; otherwise off;
- `off` (or 0/false/no/none): off;
- a path ending in `.jsonl`: that file (`NAME.rank<R>.jsonl` for ranks > 0);
- any other path: a folder, the file name as above inside it.

The writer never writes through a symbolic link (`otprune.eval.atomic.open_append`): a file it names
itself (the two cases above without `.jsonl`) is created with O_EXCL; a `.jsonl` file the user names
may exist already and is appended to, unless it is a link (an error).

Nothing in lmms-eval is patched: the context comes from `sys.argv`. `otprune report` reads these
files next to the lmms-eval results.

The settings that change a run's results (`setting_keys()`: method, layer, ratio, gamma, seed, order,
recipe) are in every record, name run_OTPrune.sh's run folders (`settings_tag`) and tell
`otprune report`'s rows apart (`normalized_settings`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from otprune import flops
from otprune.eval import atomic

RECORD_VERSION = 1
RECORD_MARKER = "otprune_record"  # key present (= RECORD_VERSION) in every per-sample line
SPEC_MARKER = "otprune_spec"  # the first line of a process's file: its RunSpec (`RecordWriter.start`)
END_MARKER = "otprune_end"  # the last line: what the process evaluated (`RecordWriter.close`)
FILE_PREFIX = "otprune_records"
REQUIRED_STATS = ("seq_len_before",)

# The settings that change a run's results (a setting the method does not use is None): these,
# then every registered method parameter (`param_keys()`: gamma, seed, ...).



def param_keys() -> tuple[str, ...]:
    """Every registered method parameter's name (gamma, seed, ...), in registration order."""
    from otprune.methods import all_params

    return tuple(all_params())


def setting_keys() -> tuple[str, ...]:
    """method, layer, ratio, the method parameters, order, recipe: what tells two runs apart."""
    return ("method", "layer", "ratio", *param_keys(), "order", "recipe")

# lmms-eval 0.7's order of model-name keys in --model_args (loggers/evaluation_tracker.py).
_MODEL_NAME_KEYS = ("peft=", "delta=", "pretrained=", "model=", "model_version=", "model_name=", "model_id=", "path=", "engine=")


def sanitize_model_name(model_name: str) -> str:
    """The folder name lmms-eval 0.7 gives a model: its last two path parts, special characters -> "__"."""
    parts = model_name.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    return re.sub(r"[\"<>:/\|\\?\*\[\]]+", "__", tail)


def model_name_from_args(model_args: str) -> str:
    """The model name lmms-eval 0.7 takes from `--model_args` (e.g. the `pretrained=` value), or ""."""
    for key in _MODEL_NAME_KEYS:
        if key in model_args:
            return model_args.split(key, 1)[1].split(",")[0]
    return ""


def lmms_eval_context(argv: Sequence[str] | None = None, modules: Mapping | None = None) -> dict | None:
    """The lmms-eval run this process belongs to, read from its command line, or None.

    Returns {"output_path", "model_args", "tasks", "limit", "model_dir"} when lmms-eval is
    running (imported, or the program is lmms_eval / lmms-eval) and `--output_path` was given.
    `model_dir` is the folder lmms-eval writes its results to.
    """
    argv = list(sys.argv if argv is None else argv)
    modules = sys.modules if modules is None else modules
    program = os.path.basename(os.path.dirname(argv[0])) + "/" + os.path.basename(argv[0]) if argv else ""
    if "lmms_eval" not in modules and "lmms_eval" not in program and "lmms-eval" not in program:
        return None
    options = _options(argv[1:], ("--output_path", "--model_args", "--tasks", "--limit"))
    output_path = options.get("--output_path")
    if not output_path:
        return None
    model_args = options.get("--model_args") or ""
    model_dir = Path(output_path) / sanitize_model_name(model_name_from_args(model_args))
    return {
        "output_path": output_path,
        "model_args": model_args,
        "tasks": options.get("--tasks"),
        "limit": options.get("--limit"),
        "model_dir": str(model_dir),
    }


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (e.g. "lmms-eval"), or None."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def records_path(
    target: str, context: dict | None, *, rank: int = 0, pid: int | None = None, stamp: str | None = None
) -> Path | None:
    """The JSONL file for `target` ("auto", "off" or a path; see the module doc), or None = off."""
    pid = os.getpid() if pid is None else pid
    stamp = time.strftime("%Y%m%d_%H%M%S") if stamp is None else stamp
    name = f"{FILE_PREFIX}_{stamp}_r{rank}_{pid}.jsonl"
    if target == "off":
        return None
    if target == "auto":
        return None if context is None else Path(context["model_dir"]) / name
    path = Path(target).expanduser()
    if path.suffix == ".jsonl":
        return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}.jsonl")
    return path / name


def decoder_size(
    stats: Mapping | None = None,
    *,
    config: object = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    layers: int | None = None,
) -> flops.DecoderSize:
    """The decoder sizes: explicit numbers first, then `config`, then the stats' own fields."""
    if hidden is not None or intermediate is not None or layers is not None:
        if hidden is None or intermediate is None or layers is None:
            raise ValueError(
                f"hidden={hidden!r}, intermediate={intermediate!r}, layers={layers!r}: give all three or none"
            )
        return flops.DecoderSize(hidden, intermediate, layers)
    if config is not None:
        return flops.DecoderSize.from_config(config)
    if stats is not None:
        values = [stats.get("hidden_size"), stats.get("intermediate_size"), stats.get("num_layers", stats.get("num_hidden_layers"))]
        if all(value is not None for value in values):
            return flops.DecoderSize(int(values[0]), int(values[1]), int(values[2]))
    raise ValueError(
        "decoder sizes: unknown; pass config=model.config, or hidden/intermediate/layers, "
        "or put hidden_size/intermediate_size/num_layers in the stats"
    )


def tokens_per_layer(stats: Mapping, size: flops.DecoderSize) -> tuple[list[int], list[int]]:
    """(actual schedule, unpruned schedule) of one sample, one token count per decoder layer."""
    for key in REQUIRED_STATS:
        if stats.get(key) is None:
            raise ValueError(f"pruning stats: {key!r} missing; got keys {sorted(stats)}")
    before = _count("seq_len_before", stats["seq_len_before"])
    unpruned = [before] * size.layers
    if stats.get("tokens_per_layer") is not None:
        return flops.check_schedule(stats["tokens_per_layer"], size), unpruned
    layer = stats.get("layer")
    after = stats.get("seq_len_after")
    if layer is None or after is None:
        return list(unpruned), unpruned
    layer = _count("layer", layer)
    if layer >= size.layers:
        raise ValueError(f"pruning stats: layer={layer} but the model has {size.layers} layers")
    after = _count("seq_len_after", after)
    return [before] * layer + [after] * (size.layers - layer), unpruned


def make_record(stats: Mapping, size: flops.DecoderSize, **context) -> dict:
    """One JSON-ready record: `context`, the stats, the sizes, the schedule and its TFLOPs."""
    schedule, unpruned = tokens_per_layer(stats, size)
    record = {RECORD_MARKER: RECORD_VERSION, **context}
    record.update({key: _plain(value) for key, value in stats.items()})
    record.update(
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_layers=size.layers,
        tokens_per_layer=schedule,
        tflops=flops.schedule_flops(schedule, size.hidden, size.intermediate) / flops.TERA,
        tflops_unpruned=flops.schedule_flops(unpruned, size.hidden, size.intermediate) / flops.TERA,
    )
    return record


def _method_uses(method: str | None) -> tuple[str, ...]:
    """The method parameters (gamma, seed, ...) that `method` takes; () for unknown methods."""
    from otprune.methods import find

    if method is None:
        return ()
    try:
        return tuple(spec.name for spec in find(method).params())
    except ValueError:
        return ()


def setting_defaults(method: str | None = None) -> dict:
    """The default of every method parameter (`method`'s own where it takes one) and of order."""
    from otprune.methods import all_params, find

    out = {name: spec.default for name, spec in all_params().items()}
    if method is not None:
        try:
            out.update({spec.name: spec.default for spec in find(method).params()})
        except ValueError:
            pass
    out["order"] = "ascending"
    return out


def result_settings(config) -> dict:
    """The settings of a `PruneConfig` that change results, {key: value} for `setting_keys()`.

    All None when `config` is None or pruning is off; gamma / seed only for the methods that take
    them (OTPrune / random); ratio None for VTW and FitPrune; recipe = FitPrune's recipe file.
    """
    if config is None or not config.enabled:
        return dict.fromkeys(setting_keys())
    params = config.method_params()
    recipe = None
    if config.method == "fitprune":
        recipe = getattr(config.recipe, "source", None) or None
    out = dict.fromkeys(setting_keys())
    out.update(method=config.method, layer=config.layer, ratio=config.ratio, order=config.order, recipe=recipe)
    out.update({name: value for name, value in params.items() if name in out})
    return out


def normalized_settings(values: Mapping) -> dict:
    """`setting_keys()` of a record: method lower case; for a pruned run a missing
    gamma / seed / order is PruneConfig's default (records written before they were recorded), a
    gamma / seed the method does not take is None; everything None when unpruned."""
    from otprune.methods import all_params

    method = values.get("method")
    if method is None:
        return dict.fromkeys(setting_keys())
    method = str(method).strip().lower()
    defaults = setting_defaults(method)
    uses = _method_uses(method)
    out = {key: values.get(key) for key in setting_keys()}
    out["method"] = method
    for key in param_keys():
        out[key] = (defaults[key] if out[key] is None else out[key]) if key in uses else None
    out["order"] = out["order"] or defaults["order"]
    from otprune.eval.adaptive import parse_ratio

    kinds = {"layer": int, "ratio": parse_ratio, **{name: spec.kind for name, spec in all_params().items()}}
    for key, kind in kinds.items():
        if out.get(key) is not None:
            out[key] = kind(out[key])
    return out


def _number(value: float) -> str:
    return f"{value:.12g}"


def settings_tag(settings: Mapping, name: str | None = None) -> str:
    """The run-folder name of `settings` (run_OTPrune.sh), `name` replacing the method's name.

    "original" when unpruned; `<name>_r<ratio>_l<layer>`, plus `_g<gamma>`, `_s<seed>`, `_<order>` for
    the values that differ from PruneConfig's defaults (so folders of earlier runs stay valid);
    VTW (no ratio): `<name>_l<layer>`; FitPrune: `<name>_<recipe file stem>-<8 hex digits of its
    content's sha256>` (its layers and counts are the recipe's).
    """
    if settings.get("method") is None:
        return "original"
    values = normalized_settings(settings)
    label = (name or values["method"]).lower()
    if values["recipe"] is not None:
        path = Path(values["recipe"])
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        except OSError:
            digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
        return f"{label}_{path.stem}-{digest}"
    from otprune.eval.adaptive import ratio_tag

    tag = label if values["ratio"] is None else f"{label}_{ratio_tag(values['ratio'])}"
    tag += f"_l{values['layer']}"
    defaults = setting_defaults(values["method"])
    from otprune.methods import all_params

    for name, spec in all_params().items():
        value = values.get(name)
        if value is not None and value != defaults[name]:
            tag += f"_{spec.tag}{_number(value) if isinstance(value, float) else value}"
    if values["order"] != defaults["order"]:
        tag += f"_{values['order']}"
    return tag


def _env_config(environ: Mapping[str, str] | None = None):
    """The environment's PruneConfig, or None when it does not parse."""
    from otprune.config import PruneConfig

    try:
        return PruneConfig.from_env(environ)
    except (ValueError, OSError):
        return None


def _fill_settings(sample: Mapping, prune) -> dict:
    """`sample` with gamma, seed, order and recipe: its own values, else those of `prune` (the PruneConfig that ran)."""
    out = dict(sample)
    settings = result_settings(prune) if sample.get("method") is not None else dict.fromkeys(setting_keys())
    for key in (*param_keys(), "order", "recipe"):
        if out.get(key) is None:
            out[key] = settings[key]
    return out


def _same_setting(sample: Mapping, settings: Mapping) -> bool:
    method = sample.get("method")
    if method is None or settings["method"] is None or str(method).lower() != settings["method"]:
        return False
    return sample.get("layer") == settings["layer"] and sample.get("ratio") == settings["ratio"]


class RecordWriter:
    """Appends records to one JSONL file (or does nothing when `path` is None)."""

    def __init__(self, path: str | os.PathLike | None, *, context: dict | None = None, rank: int = 0,
                 run_id: str | None = None, exclusive: bool = False) -> None:
        """`run_id`: the lmms-eval call (`OTPRUNE_RUN_ID`), in every line; `exclusive`: `path` is a
        name of the writer's own, so it must not exist yet (else an existing regular file is appended to)."""
        self.path = None if path is None else Path(path)
        self.context = dict(context or {})
        self.rank = rank
        self.run = f"{time.strftime('%Y%m%d_%H%M%S')}_r{rank}_{os.getpid()}"
        self.run_id = run_id
        self.exclusive = exclusive
        self.count = 0
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file this writer opened first
        self.spec = None  # the RunSpec of `start`, None before
        self.started_at: float | None = None
        self.closed = False
        self.requests: dict[str, int] | None = None  # request type -> count (None: not accounted)
        self.documents: dict[str, set] = {}  # task -> doc ids of the requests
        self.request_kind: str | None = None  # the lmms-eval request type being evaluated (`instrument`)
        self.announced: list[list] = []  # [task, doc id] of the documents whose images the model fetched since the last record

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> RecordWriter:
        """The writer `OTPRUNE_RECORDS` and the lmms-eval command line ask for (see the module doc)."""
        from otprune.config import process_rank, records_target, run_id

        target = records_target(environ)
        rank = process_rank(environ)
        context = lmms_eval_context(argv) if target != "off" else None
        path = records_path(target, context, rank=rank)
        exclusive = target == "auto" or not target.endswith(".jsonl")
        fields = {key: context[key] for key in ("output_path", "model_args", "tasks", "limit")} if context else {}
        if context:
            env = os.environ if environ is None else environ
            fields["lmms_eval_version"] = installed_version("lmms-eval")
            # MMBench's GPT judge: lmms-eval reads MODEL_VERSION (None = its default judge)
            fields["mmbench_judge"] = (env.get("MODEL_VERSION") or "").strip() or None
        return cls(path, context=fields, rank=rank, run_id=run_id(environ) if path is not None else None,
                   exclusive=exclusive)

    def start(self, spec) -> None:
        """Write this process's first line: its `RunSpec` (what it evaluates), run id, rank and world
        size; the last line (`close`) follows when the process exits. No-op when recording is off or
        when already started."""
        if self.path is None or self.spec is not None:
            return
        import atexit

        self.spec = spec
        self.started_at = time.time()
        line = {SPEC_MARKER: RECORD_VERSION, "run_id": self.run_id, "run": self.run, "rank": self.rank,
                "world_size": _world_size(), "time": self.started_at, "spec": spec.to_dict(),
                "spec_digest": spec.digest, **self.context}  # fmt: skip
        self._append((json.dumps(line) + "\n").encode("utf-8"))
        atexit.register(self.close)

    def account(self, requests: Iterable) -> None:
        """Count the lmms-eval requests (`Instance`s: request type, task, doc id) this process is
        about to evaluate; the closing line holds the counts, which the report compares with the
        records (one pruning record per request) and with lmms-eval's number of documents."""
        if self.path is None:
            return
        if self.requests is None:
            self.requests = {}
        for request in requests:
            kind = str(getattr(request, "request_type", "?"))
            self.requests[kind] = self.requests.get(kind, 0) + 1
            task = str(getattr(request, "task_name", "?"))
            self.documents.setdefault(task, set()).add(str(getattr(request, "doc_id", "?")))

    def announce(self, task: object, doc_id: object) -> None:
        """The model is fetching the images of document (task, doc_id) for its next forward."""
        self.announced.append([str(task), str(doc_id)])

    def _documents_of(self, count: int) -> list:
        """The document of each of the next `count` records: for a loglikelihood prefill of one sample after
        exactly one announced document, that document (exact: lmms-eval's models fetch a request's images
        right before its forward); otherwise unknown (None). The announcements are then consumed."""
        docs = [None] * count
        if self.request_kind == "loglikelihood" and count == 1 and len(self.announced) == 1:
            docs = [self.announced[0]]
        self.announced = []
        return docs

    def close(self) -> None:
        """Write the closing line (once): request and document counts, the number of records and, on
        rank 0, the sha256 of each lmms-eval results file this process wrote (how the report joins
        results to this process's spec)."""
        if self.path is None or self.spec is None or self.closed:
            return
        self.closed = True
        line = {END_MARKER: RECORD_VERSION, "run_id": self.run_id, "run": self.run, "rank": self.rank,
                "world_size": _world_size(), "time": time.time(), "records": self.count,
                "requests": None if self.requests is None else sum(self.requests.values()),
                "request_types": self.requests,
                "documents": {task: len(ids) for task, ids in sorted(self.documents.items())},
                "results": self._results() if self.rank == 0 else []}  # fmt: skip
        try:
            self._append((json.dumps(line) + "\n").encode("utf-8"))
        except OSError as err:  # at exit: say so, the report then lists the run as unverified
            print(f"otprune: cannot close the records of this run ({err})", file=sys.stderr)

    def _results(self) -> list[dict]:
        """The lmms-eval results files written in this process's results folder since `start`."""
        folder = self.path.parent
        found = []
        for path in sorted(folder.glob("*_results.json")):
            try:
                if path.stat().st_mtime < (self.started_at or 0.0) - 1.0:
                    continue
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                continue
            found.append({"name": path.name, "sha256": digest})
        return found

    def write(
        self,
        stats: Mapping | Sequence[Mapping],
        *,
        config: object = None,
        hidden: int | None = None,
        intermediate: int | None = None,
        layers: int | None = None,
        model: str | None = None,
        prune: object = None,
    ) -> list[dict]:
        """Append one line per sample of `stats` (a dict or a list of dicts); returns the records.

        `prune`: the `PruneConfig` that ran (gamma, seed, order, recipe of the records); when None,
        the environment's, for the samples whose method / layer / ratio it matches.
        """
        if self.path is None:
            return []
        samples = [stats] if isinstance(stats, Mapping) else list(stats)
        if model is None and config is not None:
            model = getattr(config, "_name_or_path", None) or None
        guessed = None if prune is not None else _env_config()
        now = time.time()
        records = []
        documents = self._documents_of(len(samples))
        for sample, document in zip(samples, documents, strict=True):
            if not isinstance(sample, Mapping):
                raise ValueError(f"pruning stats: expected a dict per sample, got {type(sample).__name__}")
            ran = prune
            if ran is None and guessed is not None and _same_setting(sample, result_settings(guessed)):
                ran = guessed
            sample = _fill_settings(sample, ran)
            size = decoder_size(sample, config=config, hidden=hidden, intermediate=intermediate, layers=layers)
            context = {"time": now, "run": self.run, "run_id": self.run_id, "rank": self.rank, "index": self.count,
                       **self.context}
            if model is not None:
                context["model"] = model
            if document is not None:
                context["doc"] = document  # [task, doc id]: which document this forward scored
            records.append(make_record(sample, size, **context))
            self.count += 1
        self._append("".join(json.dumps(record) + "\n" for record in records).encode("utf-8"))
        return records

    def _append(self, data: bytes) -> None:
        """Append `data` to this writer's file, never through a link (see the module doc)."""
        if self._identity is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                handle, info = atomic.open_append(self.path, create=True)
            except FileExistsError:
                if self.exclusive:
                    raise
                handle, info = atomic.open_append(self.path, create=False)
            self._identity = (info.st_dev, info.st_ino)
        else:
            handle, info = atomic.open_append(self.path, create=False)
            if (info.st_dev, info.st_ino) != self._identity:
                os.close(handle)
                raise OSError(f"{self.path}: replaced by another file since this writer opened it; records not appended")
        try:
            while data:
                data = data[os.write(handle, data):]
        finally:
            os.close(handle)


_default_writer: RecordWriter | None = None


def default_writer() -> RecordWriter:
    """This process's writer, made from the environment on first use."""
    global _default_writer
    if _default_writer is None:
        _default_writer = RecordWriter.from_env()
    return _default_writer


def record(stats: Mapping | Sequence[Mapping], **fields: object) -> list[dict]:
    """Record one prefill's per-sample stats with this process's writer (no-op when recording is off);
    `fields`: the keywords of `RecordWriter.write` (config, hidden, intermediate, layers, model, prune).

    Call it from the model's `on_pruning_stats` hook:
    `otprune.eval.records.record(stats, config=self.config, prune=self.pruning_config())`.
    """
    writer = default_writer()
    return writer.write(stats, **fields) if writer.enabled else []


def reset() -> None:
    """Close and forget this process's writer (the next `record` reads the environment again)."""
    global _default_writer
    if _default_writer is not None:
        _default_writer.close()
    _default_writer = None


def start(spec) -> RecordWriter:
    """Start this process's records with its `RunSpec` (`otprune.eval.runspec.RunSpec.from_process()`):
    the evidence of what it evaluates. Returns the writer (disabled when recording is off)."""
    writer = default_writer()
    if writer.enabled and writer.spec is None:
        writer.start(spec)
    return writer


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError:
        return 1


def is_record(line: Mapping) -> bool:
    return isinstance(line, Mapping) and line.get(RECORD_MARKER) is not None


def is_evidence(line: Mapping) -> bool:
    """A line of a records file: a per-sample record, the spec line or the closing line."""
    return isinstance(line, Mapping) and any(line.get(key) is not None for key in (RECORD_MARKER, SPEC_MARKER, END_MARKER))


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """The records of one JSONL file, in order: a line that is not JSON is an error; lines without
    the record marker are skipped. (Scanning a whole log folder, where a foreign or cut-short file
    is skipped with a warning instead, is `otprune.eval.report.collect.find_record_runs`.)
    """
    with open(path, encoding="utf-8") as lines:
        for number, value in json_lines(lines):
            if isinstance(value, json.JSONDecodeError):
                raise ValueError(f"{path}:{number}: not JSON ({value.msg}); is the file truncated?")
            if is_record(value):
                yield value


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, object]]:
    """(line number from 1, the line's JSON value, or the `json.JSONDecodeError` it raised) for every
    non-blank line."""
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, err


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of one JSONL file (lines without the record marker are skipped)."""
    return list(iter_records(path))


def _options(args: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """Values of `--name value` / `--name=value` options (the last one wins)."""
    found: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        name, equals, value = arg.partition("=")
        if name in names:
            if equals:
                found[name] = value
            elif index + 1 < len(args):
                found[name] = args[index + 1]
                index += 1
        index += 1
    return found


def _count(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"pruning stats: {name}={value!r}: must be an integer >= 0")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"pruning stats: {name}={value!r}: must be an integer >= 0") from None
    if number != value or number < 0:
        raise ValueError(f"pruning stats: {name}={value!r}: must be an integer >= 0")
    return number


def _plain(value):
    """JSON-ready copy of a stats value (tensors / numpy scalars -> Python numbers and lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
