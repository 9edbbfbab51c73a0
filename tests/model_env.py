"""The environment of the model tests: no pruning switch set, no hub access, no records."""

PRUNING_ENV = ("BASELINE", "LAYER_INDEX", "SUBSET_RATIO", "OTPRUNE_GAMMA", "OTPRUNE_SEED", "OTPRUNE_ORDER", "FITPRUNE_RECIPE", "CDPRUNER_CLIP", "CDPRUNER_THETA")


def clear_model_env(monkeypatch) -> None:
    """Remove every pruning switch, go offline, switch records off (for one test, via monkeypatch)."""
    for name in PRUNING_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OTPRUNE_RECORDS", "off")
