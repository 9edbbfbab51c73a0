"""The README's "Model families x paths" table is the output of `otprune families`, generated from
`otprune.hf.FAMILIES` and the vLLM plugin's registry (`otprune.serve.PRUNED` / `MODELS`)."""

from pathlib import Path

from otprune.cli import main
from otprune.commands.families_cmd import readme_block, table
from otprune.hf import FAMILIES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_the_generated_one():
    assert readme_block(README.read_text(encoding="utf-8")) == table(), (
        "README.md: the families table is out of date; replace it with the output of `otprune families`"
    )


def test_one_row_per_family_from_the_registries(monkeypatch):
    from otprune import serve

    rows = table().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{name}`" for name in FAMILIES]
    def gemma() -> str:
        return next(row for row in table().splitlines() if row.startswith("| `gemma3`"))

    assert gemma().endswith("| prunes images without pan-and-scan (`Gemma3ForConditionalGeneration`) |")
    monkeypatch.setitem(serve.PRUNED, "Gemma3ForConditionalGeneration", "Gemma 3, images, videos")  # what it prunes
    assert gemma().endswith("| prunes images, videos (`Gemma3ForConditionalGeneration`) |")
    monkeypatch.setitem(serve.PRUNED, "Gemma3ForConditionalGeneration", "Gemma 3")  # no list: images
    assert gemma().endswith("| prunes images (`Gemma3ForConditionalGeneration`) |")
    monkeypatch.delitem(serve.PRUNED, "Gemma3ForConditionalGeneration")  # a family the plugin does not prune
    assert gemma().endswith("| registered, refused with a switch (serves unpruned without) |")


def test_check_flags_a_stale_readme(tmp_path, capsys):
    assert main(["families", "--check", str(README)]) == 0
    stale = tmp_path / "README.md"
    stale.write_text(README.read_text(encoding="utf-8").replace("`gemma3`: prunes", "`gemma3`: runs"), encoding="utf-8")
    assert main(["families", "--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().out
