"""Seeded, batched DDPM / DDIM sampling through diffusers schedulers.

A hand loop over `scheduler.step` rather than `DDPMPipeline`, because the pipeline neither handles
vector data nor exposes the per-step x0 prediction (`pred_original_sample`), which attribution
(Journey-TRAK) and trajectory-based constraints need.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from condiff.models import null_class_label, sample_shape_of
from condiff.rundir import RunDirectoryError, write_atomic
from condiff.runtime import progress_bar, resolve_device


@dataclass
class SampleOutput:
    samples: torch.Tensor                   # (N, *shape): the generated x_0
    timesteps: torch.Tensor                 # (S,): the timesteps visited, from noisy to clean
    x0_predictions: torch.Tensor | None     # (S, N, *shape): the model's x_0 estimate at every step
    latents: torch.Tensor | None = None     # latent diffusion: the generated latents, `samples` their decodes
                                            # (x0_predictions stay in the latent space)
    provenance: dict | None = None          # how they were drawn (method, steps, seed, guidance, model step...)

    def step_index(self, timestep: int) -> int:
        """The index of the visited step nearest to `timestep`."""
        return int((self.timesteps - timestep).abs().argmin())

    def save_npz(self, path) -> Path:
        """Write the arrays and the provenance (a JSON string: no pickle needed to read it) atomically; arrays
        that are not all finite are refused, the file left as it was."""
        for name in ("samples", "x0_predictions", "latents"):
            array = getattr(self, name)
            if array is not None and not torch.isfinite(array).all():
                guidance = (self.provenance or {}).get("guidance")
                cause = f"is guidance {guidance:g} too strong?" if guidance else "did the model diverge?"
                raise RunDirectoryError(f"{path}: not written: its {name} are not all finite numbers ({cause})")
        arrays = {"samples": self.samples.numpy(), "timesteps": self.timesteps.numpy(),
                  "provenance": np.array(json.dumps(self.provenance or {}))}
        for name in ("x0_predictions", "latents"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name).numpy()

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as file:   # a file object: numpy would append .npz to a name
                np.savez_compressed(file, **arrays)
        return write_atomic(path, write)


def load_samples(path) -> tuple[np.ndarray, dict]:
    """(samples, provenance) of a samples .npz file; provenance is {} for files without it. Samples that
    are not finite numbers (a NaN, an infinity, text) and a provenance that is not a JSON object are refused."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            provenance = json.loads(str(arrays["provenance"])) if "provenance" in arrays.files else {}
            samples = arrays["samples"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise RunDirectoryError(f"{path}: unreadable samples file ({err})") from None
    if not isinstance(provenance, dict):
        raise RunDirectoryError(f"{path}: its provenance is not a JSON object")
    if samples.dtype.kind not in "biuf" or not np.isfinite(samples).all():
        raise RunDirectoryError(f"{path}: samples that are not all finite numbers (dtype {samples.dtype}); "
                                "the file is damaged or was drawn by a model that diverged")
    return samples, provenance


def sample_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, sample index): a sample's noise does not depend on
    the batch size, the device, or how many processes share the work."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]))
            for i in indices]


def sampling_scheduler(training_scheduler: DDPMScheduler, method: str, *, guided: bool = False):
    """A DDIM (deterministic, eta = 0), DDPM or DPM-Solver++ (2M, deterministic) scheduler on the training
    noise schedule.

    `guided`: for guided sampling, x0 predictions are not clipped (callers clamp the final sample to
    the data range instead). Clipping a guided x0 and re-deriving the noise from it drives DDIM off the
    data: a digits model's classifier confidence fell from 0.98 to 0.40 as classifier-free guidance
    went from 0.5 to 4 (DDIM-25; 0.21 with DDIM-100), and rose monotonically to 0.998 unclipped."""
    schedulers = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler}
    if method not in schedulers:
        raise ValueError(f"unknown sampling method {method!r}; choose {', '.join(schedulers)}")
    overrides = {"clip_sample": False} if guided else {}
    return schedulers[method].from_config(training_scheduler.config, **overrides)


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def network_precision(device: torch.device, mixed_precision: str):
    """The context of the network's forward pass: the device's autocast at `mixed_precision` ("fp16",
    "bf16"), or nothing at "no" (full precision: the samples stay bit-identical)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; choose no, fp16 or bf16")
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[mixed_precision])


def generate(model: torch.nn.Module, scheduler, num_samples: int, *, num_inference_steps: int = 50,
             batch_size: int = 500, seed: int = 0, record_x0: bool = False,
             class_labels: torch.Tensor | None = None, guidance=None, device: str | torch.device | None = None,
             first_index: int = 0, progress: bool = True, on_step=None, mixed_precision: str = "no",
             channels_last: bool = False, resume_from: tuple[int, torch.Tensor] | None = None) -> SampleOutput:
    """Draw `num_samples` samples on `device` (default: the accelerator's). Sample i's noise comes from
    its own generator seeded by (seed, first_index + i), so the same seed gives the same samples whatever
    the batch size, and a run split across processes (`first_index`) gives those of a single one.

    `class_labels` (N,) gives every sample's class (a class-conditional model without them samples
    unconditionally: label "no class"); `guidance` (see condiff.sampling.guidance) replaces the model's noise
    prediction by a guided one. `record_x0` keeps the x_0 prediction at every step;
    `on_step(first_index, t, x_t)` sees every step's input of every batch (to keep parts of it).

    `mixed_precision` ("fp16", "bf16") runs the network under the device's autocast (the scheduler's
    update stays in float32); `channels_last` puts the model (in place, as the move to `device`) and the
    images in NHWC memory format.

    `resume_from = (step, x)` continues trajectories from their states x (N, ...) at sampling step `step` (an index
    into the scheduler's timesteps) instead of drawing x_T: another model's path from a shared midpoint.
    DDIM is deterministic from there; DDPM draws its later noise from the per-sample generators afresh."""
    device = resolve_device(device)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = network_precision(device, mixed_precision)
    shape = sample_shape_of(model)
    null = null_class_label(model)
    if class_labels is None and null is not None:
        class_labels = torch.full((num_samples,), null, dtype=torch.long)
    scheduler.set_timesteps(num_inference_steps)
    first_step, initial = resume_from if resume_from is not None else (0, None)
    if initial is not None and tuple(initial.shape) != (num_samples, *shape):
        raise ValueError(f"resume_from: states of shape {tuple(initial.shape)}, expected {(num_samples, *shape)}")
    # Moved to the device once: a per-step copy of the timestep is a host-to-device transfer on a GPU.
    model_timesteps = scheduler.timesteps.to(device)
    samples, x0_batches = [], []
    starts = range(0, num_samples, batch_size)
    bar = progress_bar(total=len(starts) * (len(scheduler.timesteps) - first_step), desc="sample", enabled=progress)
    # inference_mode skips autograd's bookkeeping (about 3% per call on the digits UNet against the no_grad
    # that DDIMPipeline uses). Guidance takes gradients, and on_step's callers may train on what they keep:
    # those run under no_grad. The outputs are concatenated outside it, so they are plain tensors.
    with torch.no_grad() if guidance is not None or on_step is not None else torch.inference_mode():
        for start in starts:
            n = min(batch_size, num_samples - start)
            scheduler.set_timesteps(num_inference_steps)   # multistep solvers keep earlier outputs: each batch afresh
            generator = sample_generators(seed, range(first_index + start, first_index + start + n))
            x = (randn_tensor((n, *shape), generator=generator, device=device) if initial is None
                 else initial[start:start + n].to(device))
            if channels_last and x.ndim == 4:   # NHWC from the start: convolutions keep it, the scheduler too
                x = x.contiguous(memory_format=torch.channels_last)
            labels = None if class_labels is None else class_labels[start:start + n].to(device)
            x0_steps = []
            for t, model_t in zip(scheduler.timesteps[first_step:], model_timesteps[first_step:]):
                if on_step is not None:
                    on_step(start, int(t), x)
                timesteps = model_t.expand(n)
                with precision:
                    eps = (model(x, timesteps, class_labels=labels).sample if guidance is None
                           else guidance.noise(model, x, timesteps, labels))
                out = scheduler.step(eps.to(x.dtype), t, x, generator=generator)
                x = out.prev_sample
                if record_x0:
                    x0_steps.append(out.pred_original_sample.cpu())
                bar.update()
            samples.append(x.cpu().contiguous())   # NCHW again after channels_last (a no-op otherwise)
            if record_x0:
                x0_batches.append(torch.stack(x0_steps))
    bar.close()
    return SampleOutput(torch.cat(samples), scheduler.timesteps[first_step:].clone(),
                        torch.cat(x0_batches, dim=1) if record_x0 else None)
