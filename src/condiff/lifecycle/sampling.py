"""Sampling a trained run: RUN/samples.npz (with how it was drawn) and a PNG grid, on any device and
split across processes; guided samples of one class; the noise-aware classifier classifier guidance uses.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from accelerate.utils import gather_object
from diffusers import DDPMPipeline

from condiff.config import ArgumentError, ExperimentConfig, check_seed
from condiff.data.latent import decode_latents, encode_dataset
from condiff.models import null_class_label
from condiff.report import save_sample_grid
from condiff.rundir import RunDirectory, RunDirectoryError, save_pretrained_atomic, write_json_atomic
from condiff.lifecycle.build import build_data, load_latent_autoencoder, load_pipeline, load_run_config
from condiff.runtime import process_state, resolve_device
from condiff.sampling.generate import SampleOutput, generate, sampling_scheduler
from condiff.sampling.guidance import GUIDANCE_KINDS, ClassifierFreeGuidance, ClassifierGuidance
from condiff.sampling.noise_classifier import NoiseAwareClassifier, noisy_accuracy, train_noise_aware_classifier

# The arrays of a SampleOutput that have one entry per sample, and the axis it is on.
PER_SAMPLE_AXIS = {"samples": 0, "x0_predictions": 1, "latents": 0}


def model_provenance(run_dir: Path) -> dict:
    """Which model a sample file came from: the run's training step and a digest of its weights."""
    run = RunDirectory(run_dir).require_model()
    weights = sorted((run.model).glob("*/diffusion_pytorch_model.safetensors"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in weights)).hexdigest()[:16]
    return {"model_step": run.read_summary()["steps"], "model_sha256": digest}


def sampling_settings(run_dir: Path, *, num_samples: int | None = None, method: str | None = None,
                      steps: int | None = None, seed: int | None = None, class_label: int | None = None,
                      guidance: float = 0.0, guidance_kind: str | None = None) -> dict:
    """The provenance a sample file drawn with these arguments records (the config fills what is None)."""
    config = load_run_config(run_dir).sample
    # Recorded only when used, so that files drawn in full precision before the key existed still match.
    precision = {} if config.mixed_precision == "no" else {"mixed_precision": config.mixed_precision}
    return {"method": method or config.method, "steps": steps or config.steps,
            "seed": config.seed if seed is None else seed, "num_samples": num_samples or config.num_samples,
            "class_label": class_label, "guidance": guidance, "guidance_kind": guidance_kind,
            **precision, **model_provenance(run_dir)}


def gather_output(output: SampleOutput) -> SampleOutput:
    """Every process's share of the samples, concatenated in sample order, on every process."""
    for name, axis in PER_SAMPLE_AXIS.items():
        part = getattr(output, name)
        if part is not None:
            setattr(output, name, torch.cat(gather_object([part]), dim=axis))
    return output


def sample_run(run_dir: Path, *, num_samples: int | None = None, method: str | None = None,
               steps: int | None = None, seed: int | None = None, batch_size: int | None = None,
               record_x0: bool = False, class_label: int | None = None, guidance: float = 0.0,
               guidance_kind: str | None = None, device: str | torch.device | None = None,
               progress: bool = True) -> Path:
    """Sample a trained run into RUN/samples.npz and a PNG grid RUN/samples.png; returns the .npz path.
    A latent-diffusion run's samples are decoded to images (its latents are kept beside them). The file
    records how it was drawn (`provenance`: method, steps, seed, guidance, model step and digest).

    Runs on `device` (default: the accelerator's). Under several processes each draws its share of the
    samples (the same samples as one process: every sample has its own seeded noise) and only the main
    process writes. The config's `sample.mixed_precision` and `sample.channels_last` set the network's
    precision and memory format (see `generate`).

    `class_label` samples one class: a class-conditional model by its label, an unconditional one
    through its noise-aware classifier (`train_noise_classifier_run`). `guidance` = eta > 0 sharpens
    that class (condiff.sampling.guidance): `guidance_kind` "cfg" (classifier-free; the default for
    class-conditional models) or "classifier". Class samples go to RUN/samples-class{C}-{kind}{eta}.npz,
    so that RUN/samples.npz stays the unconditional samples `evaluate` reads."""
    run_dir = Path(run_dir)
    run_config = load_run_config(run_dir)
    check_sampling_arguments(run_config, steps, seed)
    config = run_config.sample
    device = resolve_device(device)
    autoencoder = load_latent_autoencoder(run_config, run_dir)
    pipeline = load_pipeline(run_dir)
    n = num_samples or config.num_samples
    guide, labels, path, title, kind = run_guidance(run_dir, pipeline, class_label, guidance, guidance_kind, n, device)
    provenance = sampling_settings(run_dir, num_samples=n, method=method, steps=steps, seed=seed,
                                   class_label=class_label, guidance=guidance, guidance_kind=kind)
    scheduler = sampling_scheduler(pipeline.scheduler, provenance["method"], guided=guide is not None)
    state = process_state()
    with state.split_between_processes(list(range(n))) as mine:
        first = mine[0] if mine else 0
        output = generate(pipeline.unet, scheduler, len(mine), num_inference_steps=provenance["steps"],
                          batch_size=batch_size or config.batch_size, seed=provenance["seed"], record_x0=record_x0,
                          class_labels=None if labels is None else labels[first:first + len(mine)],
                          guidance=guide, device=device, first_index=first,
                          progress=progress and state.is_main_process, mixed_precision=config.mixed_precision,
                          channels_last=config.channels_last)
    if guide is not None and pipeline.scheduler.config.clip_sample:
        output.samples.clamp_(-1.0, 1.0)   # the data range, which unclipped guided steps may overshoot
    if autoencoder is not None:
        output.latents, output.samples = output.samples, decode_latents(autoencoder.to(device), output.samples)
    if state.num_processes > 1:
        output = gather_output(output)
    output.provenance = provenance
    if state.is_main_process:
        output.save_npz(path)
        save_sample_grid(output.samples[:256], path.with_suffix(".png"), title=f"{run_dir.name}: {title}")
    state.wait_for_everyone()
    return path


def check_sampling_arguments(config: ExperimentConfig, steps: int | None, seed: int | None) -> None:
    """Refuse, before anything is loaded or drawn, a seed out of range and inference steps that the run's
    training schedule cannot space out (diffusers would fail mid-command)."""
    timesteps = config.diffusion.num_train_timesteps
    if steps is not None and not 1 <= steps <= timesteps:
        raise ArgumentError("steps", f"{steps} inference steps: must be from 1 to the {timesteps} timesteps the run was "
                          "trained on (its diffusion.num_train_timesteps)")
    if seed is not None:
        check_seed(seed, "seed")


def run_guidance(run_dir: Path, pipeline: DDPMPipeline, class_label: int | None, scale: float,
                 kind: str | None, num_samples: int, device: torch.device):
    """(guidance object or None, class labels or None, output path, title, guidance kind) for `sample_run`."""
    if class_label is None:
        if scale or kind:
            raise ArgumentError("guidance", "needs {class_label}, the class to guide towards")
        return None, None, RunDirectory(run_dir).samples_file, "samples", None
    if not 0 <= scale < math.inf:   # a NaN scale fails both comparisons
        raise ArgumentError("guidance", f"must be finite and non-negative, got {scale}")
    null = null_class_label(pipeline.unet)
    kind = kind or ("cfg" if null is not None else "classifier")
    if kind not in GUIDANCE_KINDS:
        raise ArgumentError("guidance_kind", f"{kind!r} is not one of {', '.join(GUIDANCE_KINDS)}")
    if kind == "cfg" and null is None:
        raise ArgumentError("guidance_kind", f"cfg: the model of {run_dir} is not class-conditional (train it with "
                          "model.class_conditional = true and train.label_dropout > 0), use classifier guidance")
    classifier = load_noise_classifier(run_dir).to(device) if kind == "classifier" else None
    num_classes = null if null is not None else classifier.config.num_classes
    if not 0 <= class_label < num_classes:
        raise ArgumentError("class_label", f"{run_dir} has classes 0-{num_classes - 1}, not {class_label}")
    if kind == "cfg":
        guide = ClassifierFreeGuidance(scale) if scale else None   # eta = 0: the conditional model itself
    else:
        guide = ClassifierGuidance(classifier, scale, pipeline.scheduler.alphas_cumprod)
    labels = torch.full((num_samples,), class_label, dtype=torch.long)
    title = f"class {class_label}, {'classifier-free' if kind == 'cfg' else 'classifier'} guidance {scale:g}"
    return guide, labels, run_dir / f"samples-class{class_label}-{kind}{scale:g}.npz", title, kind


def load_noise_classifier(run_dir: Path) -> NoiseAwareClassifier:
    path = RunDirectory(run_dir).noise_classifier
    if not (path / "config.json").is_file():
        raise RunDirectoryError(f"{path}: no noise-aware classifier; train one with `condiff noise-classifier "
                                f"{run_dir}` for classifier guidance")
    return NoiseAwareClassifier.from_pretrained(path, use_safetensors=True).eval()


def train_noise_classifier_run(run_dir: Path, *, steps: int = 2000, overwrite: bool = False,
                               device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Train p_phi(y | x_t, t) on a run's training data (its latents, for a latent run) into
    RUN/noise_classifier (safetensors, atomically); returns its accuracy on held-out data noised to
    t = 0, 250, 500, 750 (of 1000), also written to RUN/noise_classifier/accuracy.json."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    pipeline = load_pipeline(run_dir)
    path = RunDirectory(run_dir).noise_classifier
    if path.exists() and not overwrite:
        raise RunDirectoryError(f"{path}: exists; pass {{overwrite}} to retrain it")
    device = resolve_device(device)
    data = build_data(config)
    held_out = data.held_out if data.held_out is not None else data.reference
    autoencoder = load_latent_autoencoder(config, run_dir)
    if autoencoder is not None:
        autoencoder.to(device)
        data.train, held_out = encode_dataset(autoencoder, data.train), encode_dataset(autoencoder, held_out)
    classifier = train_noise_aware_classifier(data.train, pipeline.scheduler, steps=steps, seed=config.train.seed,
                                              device=device, progress=progress)
    chain = pipeline.scheduler.config.num_train_timesteps
    accuracy = noisy_accuracy(classifier, held_out, pipeline.scheduler, [0, chain // 4, chain // 2, 3 * chain // 4])
    save_pretrained_atomic(classifier, path)
    write_json_atomic(path / "accuracy.json", {str(t): a for t, a in accuracy.items()})
    return accuracy

