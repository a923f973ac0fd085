"""condiff: diffusion models that obey distribution constraints.

The public API, in about ten lines:

    import condiff
    config = condiff.ExperimentConfig(name="minority")
    config.constraints = condiff.ConstraintsConfig(classes=[4], gamma=0.3)
    run = condiff.train(config)                # a Run: runs/minority
    print(run.evaluate().tv_to_uniform)        # a RunEvaluation

Names are imported on first use, so `import condiff` (and the command line) stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "condiff.config": ["ArgumentError", "ConfigError", "ConstraintsConfig", "DataConfig", "DiffusionConfig", "DualConfig",
                       "EvaluateConfig", "ExperimentConfig", "FinetuneConfig", "LatentConfig", "ModelConfig",
                       "SampleConfig", "TrainConfig", "load_config"],
    "condiff.run": ["Run", "Samples", "TrainingSummary", "train"],
    "condiff.lifecycle.evaluation": ["RunEvaluation"],
    "condiff.audit.results": ["AttributionResult", "AttributionSettings"],
    "condiff.models": ["MLPDenoiser", "build_model"],
    "condiff.rundir": ["RunDirectoryError"],
    "condiff.sampling.generate": ["SampleOutput", "generate", "sampling_scheduler"],
    "condiff.sampling.guidance": ["ClassifierFreeGuidance", "ClassifierGuidance", "Guidance"],
    # the swappable parts, as Protocols: write one of these and pass it where condiff's own goes
    "condiff.training.terms": ["LossTerm"],
    "condiff.training.dual": ["DualRule"],
    "condiff.training.estimators": ["LagrangianEstimator"],
    "condiff.attribution.projector": ["Projector"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'condiff' has no attribute {name!r}")
    value = getattr(import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
