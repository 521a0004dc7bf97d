"""SD4Match prompt tuning (paper Sec. 3.2-3.3, 4.1; protocol.md "Training" and "Loss").

Only the prompt module learns: the VAE, UNet and CLIP text encoder are frozen and DINOv2 is only seen through
its cache. Each optimiser step draws ``batch_size`` pairs from a deterministic sampler, samples one VAE latent
per image from the latent cache, adds one noise draw at t = 261, runs source and target images through the
truncated UNet in one batch with the prompt of ``module.prompt_pair`` and applies the Gaussian-window matching
loss in the squashed S x S frame. Adam at a constant learning rate; the best prompt by PCK@0.1 (nearest
neighbour) on the validation pairs is saved. Checkpoints hold every state a run depends on, so a killed run
resumes and ends with exactly the result of an uninterrupted one; a finished run's checkpoint is never resumed
(a rerun trains again) and an interrupted run whose identity changed is refused (``training_state``).

Randomness (all seeded from ``settings.seed``):
- pair order: epoch ``e`` is a permutation from a generator seeded with ``seed + e``; pairs are taken in
  order, ``batch_size`` per step, across epoch boundaries;
- latents and noise: a persistent ``torch.Generator`` (checkpointed) gives one seed per step; the pair at
  position ``i`` of the step's batch draws its source latent, target latent, source noise and target noise
  from a generator seeded with ``step_seed + i`` (diffusers' per-row generators), so however the batch is
  split (``per_device_batch`` pairs per call, over accumulation steps and processes) every pair gets the same
  numbers: 1 GPU x 9 pairs, 1 GPU x 3 accumulation steps of 3 and 3 GPUs train the same prompt (to float
  rounding of the batched calls);
- validation: seeded per image / per pair, independent of training randomness (``training_validation``).

Non-finite values never reach a checkpoint: a NaN/inf loss stops the run; a NaN/inf gradient with a finite
loss stops it before the step without a grad scaler (fp32, bf16, CPU), while with fp16 the grad scaler skips
the step (the prompt is not updated), the skip is counted (checkpoint, log, the prompt's ``skipped_steps``)
and ``MAX_CONSECUTIVE_SKIPS`` skips in a row stop the run. A stopped run keeps its last good checkpoint.

Multi-GPU runs go through ``accelerate launch`` (see ``launch``); only the prompt module and the optimiser are
prepared by accelerate.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from sd4match.features import SDFeaturizer
from sd4match.gpu import join_gpu_lease, lease_fds
from sd4match.io import write_table_atomic
from sd4match.loss import check_finite, matching_loss
from sd4match.models import ModelRecord, SDComponents, load_stable_diffusion
from sd4match.prompt_learning import LearnedPrompt, build_prompt_module, save_prompt
from sd4match.training_data import (
    SEED_MODULUS,
    PairSampler,
    TrainingData,
    TrainPair,
    collate_pairs,
    dataset_name,
    load_training_data,
    record_summary,
    squashed_pairs,
)
from sd4match.training_features import PairFeatures
from sd4match.training_job import TrainJob, TrainSettings, read_job, write_job
from sd4match.training_memory import resolve_per_device_batch
from sd4match.training_state import (
    Checkpointer,
    Progress,
    RunParts,
    identity_hash,
    require_finite_prompt,
    training_identity,
)
from sd4match.training_validation import Validator

__all__ = [
    "PairSampler",
    "PromptTrainer",
    "TrainJob",
    "TrainResult",
    "TrainSettings",
    "TrainingStopped",
    "collate_pairs",
    "launch",
    "launch_command",
    "main",
    "read_job",
    "squashed_pairs",
    "train_prompt",
    "write_job",
]

log = logging.getLogger("sd4match.training")  # also when run as __main__ (accelerate launch -m)

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
ACCELERATE_PRECISION = {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}
# Steps in a row the fp16 grad scaler may skip before the run stops: each skip halves the loss scale, so
# after 20 the gradients are NaN/inf at a scale 2^20 below the start, not an fp16 overflow.
MAX_CONSECUTIVE_SKIPS = 20


@dataclass
class TrainResult:
    """Outcome of a run: the selected step, its validation PCK@0.1 (percent), steps done, the prompt file."""

    best_step: int
    best_val_pck: float
    steps_done: int
    output: str


class TrainingStopped(RuntimeError):
    """Raised by the ``stop_after`` hook of ``train_prompt``: simulates a kill right after a step."""


# ---------------------------------------------------------------------------------------------------- trainer


def require_frozen(modules: Mapping[str, nn.Module]) -> None:
    """Raise if any parameter of the frozen models requires a gradient (only the prompt may learn)."""
    for name, module in modules.items():
        trainable = [p_name for p_name, p in module.named_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(f"{name} must be frozen but {trainable[:3]} require gradients")


def run_placement(accelerator: Any = None) -> tuple[int, torch.device]:
    """Processes and device of this run: the given accelerator's, else what ``default_accelerator`` gets."""
    if accelerator is not None:
        return accelerator.num_processes, accelerator.device
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.num_processes, state.device


def default_accelerator(settings: TrainSettings) -> Any:
    """The accelerator of a plain run: CUDA with the settings' mixed precision where available, else CPU.

    A Class prompt has one parameter per category and a batch uses only some of them: DDP is told so
    (``find_unused_parameters``); a category unused on every process keeps no gradient, as in one process.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    processes = PartialState(cpu=not cuda).num_processes
    handlers = (
        [DistributedDataParallelKwargs(find_unused_parameters=True)] if settings.variant == "class" else []
    )
    return Accelerator(
        cpu=not cuda,
        mixed_precision=ACCELERATE_PRECISION[settings.precision] if cuda else "no",
        gradient_accumulation_steps=settings.accumulation_steps(processes),
        kwargs_handlers=handlers,
    )


def load_frozen_sd(
    record: ModelRecord, settings: TrainSettings, device: torch.device
) -> tuple[SDComponents, SDFeaturizer]:
    """Frozen SD components on ``device`` (gradient checkpointing as set) and their featurizer."""
    components = load_stable_diffusion(record.local_path, device=device)
    if settings.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    require_frozen({"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoder})
    featurizer = SDFeaturizer(
        components,
        device=device,
        autocast_dtype=AUTOCAST_DTYPES[settings.precision] if device.type == "cuda" else None,
        max_batch=2 * settings.per_device_batch,
    )
    return components, featurizer


def image_rows(
    generator: torch.Generator | Sequence[torch.Generator],
) -> torch.Generator | list[torch.Generator]:
    """Generators of a chunk's image rows (sources, then targets): each pair's generator serves both of its
    images, so every pair's draws are the same whatever chunk it is computed in; a single generator serves
    the whole chunk."""
    if isinstance(generator, torch.Generator):
        return generator
    return [*generator, *generator]


def log_step(progress: Progress, steps: int, optimizer: Any, rate: float) -> None:
    """One progress line: step, loss, learning rates, steps/s and the last validation PCK."""
    lrs = ",".join(f"{group['lr']:g}" for group in optimizer.param_groups)
    last_val = f"{progress.val_pck[max(progress.val_pck)]:.2f}" if progress.val_pck else "-"
    log.info(
        "step %d/%d loss %.4f lr %s %.2f steps/s val PCK@0.1 %s",
        progress.step,
        steps,
        progress.losses[-1],
        lrs,
        rate,
        last_val,
    )


def require_finite_gradients(module: nn.Module, step: int) -> None:
    """Raise FloatingPointError before the optimiser step when a prompt gradient holds NaN/inf."""
    bad = [
        name
        for name, param in module.named_parameters()
        if param.grad is not None and not bool(torch.isfinite(param.grad).all())
    ]
    if bad:
        raise FloatingPointError(
            f"non-finite gradient of prompt parameters {bad} at step {step} although the loss is finite: "
            f"the step is not taken, training stopped and the last checkpoint is kept"
        )


def count_skipped_step(progress: Progress, step: int, loss_scale: float) -> None:
    """Record a step the fp16 grad scaler skipped; ``MAX_CONSECUTIVE_SKIPS`` in a row stop the run."""
    progress.skipped_steps.append(step)
    in_a_row = progress.skips_in_a_row(step)
    log.warning(
        "step %d: non-finite gradients, the fp16 grad scaler skipped the step (prompt unchanged, loss scale "
        "now %g; %d skipped in a row)",
        step,
        loss_scale,
        in_a_row,
    )
    if in_a_row >= MAX_CONSECUTIVE_SKIPS:
        raise FloatingPointError(
            f"{in_a_row} consecutive steps skipped by the fp16 grad scaler (NaN/inf gradients at every loss "
            f"scale), the last at step {step}: training stopped and the last checkpoint is kept"
        )


def trained_prompt_metadata(
    job: TrainJob, settings: TrainSettings, data: TrainingData, progress: Progress, train_hash: str
) -> dict[str, Any]:
    """Sidecar metadata of a trained prompt: the job's metadata plus what the run selected (step, validation
    PCK), how it batched and the models it used (evaluation checks them)."""
    return {
        **job.metadata,
        "variant": settings.variant,
        "training_set": dataset_name(data.trn),
        "step": progress.best_step,
        "val_pck": progress.best_val_pck,
        "val_pairs": len(data.val),
        "val_timestep": settings.val_timestep,
        "effective_batch": settings.effective_batch,  # pairs one step's gradient averaged
        "batch_semantics": settings.batch_semantics,
        "steps_done": progress.step,
        "skipped_steps": len(progress.skipped_steps),
        "train_hash": train_hash,
        "sd_model": record_summary(data.sd_record),
        "dinov2_model": None if data.dino_record is None else record_summary(data.dino_record),
    }


class PromptTrainer:
    """One prompt-tuning run: the optimisation loop over a learned prompt with frozen SD, delegating its
    inputs (``TrainingData``), features (``PairFeatures``), validation (``Validator``) and checkpoint state
    (``training_state``)."""

    def __init__(self, job: TrainJob, accelerator: Any = None) -> None:
        self.job = job
        self.data = load_training_data(job)
        processes, device = run_placement(accelerator)
        self.settings = resolve_per_device_batch(
            job.settings, processes, device, self.data.sd_record.local_path
        )
        accelerator = default_accelerator(self.settings) if accelerator is None else accelerator
        self.accumulation = self.settings.accumulation_steps(accelerator.num_processes)
        if accelerator.gradient_accumulation_steps != self.accumulation:
            raise ValueError(
                f"accelerator has gradient_accumulation_steps={accelerator.gradient_accumulation_steps}, the "
                f"settings need {self.accumulation}"
            )
        self.accelerator, self.device = accelerator, accelerator.device
        self._load_models()
        self.features = PairFeatures(
            self.featurizer, self.components.text_encoder, self.data.dino, self.device
        )
        self.validator = Validator(self.settings, self.data, self.features, self.scaling_factor, accelerator)
        cpm = None if self.data.cpm_config is None else asdict(self.data.cpm_config)
        inputs = self.data.inputs_identity()
        self.identity = training_identity(asdict(self.settings), cpm, self.data.categories, inputs)
        self.checkpoints = Checkpointer(job.checkpoint_path, self.identity)
        self.progress = Progress()
        self.sampler = PairSampler(len(self.train_pairs), self.settings.seed)
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.val_interval = self.settings.validation_interval(len(self.train_pairs))

    def _load_models(self) -> None:
        """Frozen SD and its featurizer on the accelerator's device, the prompt module and Adam (prepared)."""
        self.components, self.featurizer = load_frozen_sd(self.data.sd_record, self.settings, self.device)
        self.scaling_factor = self.featurizer.scaling_factor
        module = self.new_prompt_module().to(self.device)
        if not all(p.requires_grad for p in module.parameters()):
            raise RuntimeError(f"prompt module {module.variant}: every parameter must be trainable")
        optimizer = torch.optim.Adam(module.parameter_groups(self.settings.lr, self.settings.lr_linear))
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)

    def new_prompt_module(self) -> LearnedPrompt:
        """The prompt module of this run at its seeded initialisation (on the CPU)."""
        return build_prompt_module(
            self.settings.variant,
            self.components.text_encoder,
            self.components.tokenizer,
            categories=self.data.categories,
            cpm=self.data.cpm_config,
            seed=self.settings.seed,
        )

    @property
    def prompt_module(self) -> LearnedPrompt:
        """The bare prompt module (unwrapped from DDP / autocast wrappers)."""
        return self.accelerator.unwrap_model(self.module)

    @property
    def train_pairs(self) -> list[TrainPair]:
        """The training pairs in the squashed frame."""
        return self.data.train_pairs

    @property
    def scaler(self) -> Any:
        """The fp16 grad scaler accelerate uses (None without fp16 mixed precision)."""
        return getattr(self.accelerator, "scaler", None)

    def train_hash(self) -> str:
        """Hash of the run's identity: everything that determines its result (``training_state``)."""
        return identity_hash(self.identity)

    # -- the optimisation step

    def chunk_loss(
        self, pairs: Sequence[TrainPair], generator: torch.Generator | Sequence[torch.Generator]
    ) -> Tensor:
        """Matching loss (paper Eq. 5) of one chunk of pairs at the training timestep. ``generator``: one per
        pair (each draws its pair's latents, then its noise), or one for the whole chunk."""
        s = self.settings
        batch = collate_pairs(pairs, self.device)
        rows = image_rows(generator)
        latents = self.data.latents.sample(batch.src_keys + batch.trg_keys, self.scaling_factor, rows)
        src_feat, trg_feat = self.features(self.module, batch, latents, s.timestep, rows)
        return matching_loss(
            src_feat,
            trg_feat,
            batch.src_kps,
            batch.trg_kps,
            batch.valid,
            s.image_size,
            temperature=s.temperature,
            window=s.window,
            sigma=s.sigma,
        )

    def train_step(self, step: int) -> float:
        """One optimiser step: ``batch_size`` pairs drawn, chunk j (``per_device_batch`` pairs) on process
        j mod P; with ``authors_code`` only chunk 0 is trained on. Returns the mean loss (all processes)."""
        s, acc = self.settings, self.accelerator
        indices = self.sampler.take(s.batch_size)
        step_seed = int(torch.randint(0, SEED_MODULUS, (1,), generator=self.generator))
        losses = []
        for micro in range(self.accumulation):
            chunk = micro * acc.num_processes + acc.process_index
            positions = range(chunk * s.per_device_batch, (chunk + 1) * s.per_device_batch)
            pairs = [self.train_pairs[indices[i]] for i in positions]
            generators = [torch.Generator().manual_seed(step_seed + i) for i in positions]
            with acc.accumulate(self.module):
                loss = self.chunk_loss(pairs, generators)
                acc.backward(loss)
            losses.append(loss.detach().float())
        step_loss = acc.reduce(torch.stack(losses).mean(), reduction="mean")
        check_finite(step_loss, step)
        self.optimizer_step(step)
        return float(step_loss)

    def optimizer_step(self, step: int) -> None:
        """Adam step, never with non-finite gradients: without a grad scaler they stop the run; with the fp16
        scaler the scaler skips the step (prompt unchanged), which is counted. The prompt must stay finite."""
        if self.scaler is None:
            require_finite_gradients(self.prompt_module, step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if getattr(self.optimizer, "step_was_skipped", False):
            count_skipped_step(self.progress, step, self.scaler.get_scale())
        require_finite_prompt(dict(self.prompt_module.named_parameters()), step)

    # -- validation

    def validate(self) -> float:
        """Mean per-pair PCK@0.1 (percent, nearest neighbour) on the validation pairs at t = val_timestep."""
        return self.validator(self.prompt_module)

    # -- checkpoints and outputs

    def run_parts(self) -> RunParts:
        """The objects whose states the checkpoint holds."""
        return RunParts(self.prompt_module, self.optimizer, self.scaler, self.generator, self.sampler)

    def save_checkpoint(self, finished: bool = False) -> None:
        """Write the checkpoint atomically (main process), then the loss curve."""
        if self.accelerator.is_main_process:
            self.checkpoints.save(self.run_parts(), self.progress, finished)
            self.write_curve()
        self.accelerator.wait_for_everyone()

    def resume(self) -> bool:
        """Resume an interrupted run of this identity from its checkpoint (``Checkpointer.resumable``)."""
        state = self.checkpoints.resumable()
        if state is None:
            return False
        self.progress = self.checkpoints.restore(state, self.run_parts())
        log.info("resumed from %s at step %d", self.checkpoints.path, self.progress.step)
        return True

    def write_curve(self) -> None:
        """Write the loss curve CSV atomically."""
        write_table_atomic(self.progress.curve(), self.job.curve)

    def save_best(self) -> None:
        """Save the best prompt with ``save_prompt`` to the job's output (main process)."""
        if self.accelerator.is_main_process:
            best = self.new_prompt_module()
            best.load_state_dict(self.progress.best_state)
            meta = trained_prompt_metadata(
                self.job, self.settings, self.data, self.progress, self.train_hash()
            )
            save_prompt(best, self.job.output, meta)
        self.accelerator.wait_for_everyone()

    # -- loop

    def after_step(self, step: int) -> None:
        """Validation and checkpoint bookkeeping after optimiser step ``step``."""
        s = self.settings
        if step % self.val_interval == 0 or step == s.steps:
            self.progress.record_validation(step, self.validate(), self.prompt_module)
        if step % s.checkpoint_every == 0 or step == s.steps:
            self.save_checkpoint()

    def log_start(self) -> None:
        """What the run trains on, how the batch is split and which batch a step averages (main process)."""
        s = self.settings
        log.info(
            "SD4Match-%s: %d training pairs, %d validation pairs, %d steps of %d pairs (%d process(es) x "
            "%d accumulation x %d), validation every %d steps at t=%d, from step %d (identity %s)",
            s.variant,
            len(self.train_pairs),
            len(self.data.val_pairs),
            s.steps,
            s.batch_size,
            self.accelerator.num_processes,
            self.accumulation,
            s.per_device_batch,
            self.val_interval,
            s.val_timestep,
            self.progress.step,
            self.train_hash(),
        )
        if s.batch_semantics == "authors_code":
            log.info(
                "batch_semantics authors_code: each step draws %d pairs and trains on the first %d only "
                "(rank 0's copy of the authors' run, whose DDP averaging was bypassed); effective batch %d",
                s.batch_size,
                s.per_device_batch,
                s.effective_batch,
            )

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train from an interrupted run's checkpoint (or from scratch) to ``settings.steps``, save the best
        prompt, then mark the checkpoint finished so that a rerun trains again."""
        s = self.settings
        self.resume()
        p = self.progress
        main = self.accelerator.is_main_process
        if main:
            self.log_start()
        self.module.train()
        started, last = time.monotonic(), p.step
        with tqdm(
            total=s.steps, initial=p.step, desc=f"train {s.variant}", unit="step", disable=not main
        ) as bar:
            for step in range(p.step + 1, s.steps + 1):
                loss = self.train_step(step)
                p.step = step
                p.losses.append(loss)
                self.after_step(step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if main and (step % s.log_every == 0 or step == s.steps):
                    rate = (step - last) / max(time.monotonic() - started, 1e-9)
                    log_step(p, s.steps, self.optimizer, rate)
                    started, last = time.monotonic(), step
                if stop_after is not None and step == stop_after:
                    raise TrainingStopped(f"stopped after step {step} (stop_after hook)")
        if p.best_state is None:
            raise RuntimeError(f"training {self.job.out_dir}: no validation ran, nothing to save")
        self.save_best()
        self.save_checkpoint(finished=True)
        if main:
            log.info("best step %d: val PCK@0.1 %.2f -> %s", p.best_step, p.best_val_pck, self.job.output)
            if p.skipped_steps:
                log.warning("%d step(s) skipped by the fp16 grad scaler", len(p.skipped_steps))
        return TrainResult(p.best_step, p.best_val_pck, p.step, str(self.job.output))


def train_prompt(job: TrainJob, accelerator: Any = None, *, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) the prompt of ``job`` and save the best one by validation PCK@0.1 to ``job.output``.

    ``stop_after`` is a test hook: raise ``TrainingStopped`` right after that step (simulates a kill).
    """
    return PromptTrainer(job, accelerator).run(stop_after=stop_after)


# ----------------------------------------------------------------------------------------------------- launch


def free_port() -> int:
    """A free TCP port for the rendezvous of a multi-GPU launch (concurrent jobs must not share one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(job_path: str | os.PathLike[str], n_gpus: int, precision: str) -> list[str]:
    """``accelerate launch`` command running ``python -m sd4match.training <job.json>`` on ``n_gpus`` GPUs."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(n_gpus),
        "--num_machines",
        "1",
        "--mixed_precision",
        ACCELERATE_PRECISION[precision],
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "sd4match.training",
        str(job_path),
    ]


def _run_streaming(command: list[str]) -> None:
    """Run ``command``, copying its output line by line to ``sys.stderr`` (the job log); raise on failure."""
    log.info("running %s", " ".join(command))
    with subprocess.Popen(  # pass_fds: the child shares the job's GPU locks, which then outlive this process
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=lease_fds()
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stderr.write(line)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)


def launch(job_path: str | os.PathLike[str], n_gpus: int) -> TrainResult | None:
    """Run the job on ``n_gpus`` GPUs (the rule's gpu resource): ``accelerate launch`` when n_gpus > 1 and
    CUDA is available, else in this process. Returns the result of an in-process run."""
    job = read_job(job_path)
    if n_gpus > 1 and job.settings.batch_semantics == "authors_code":
        raise ValueError(
            f"launch {job_path}: batch_semantics 'authors_code' trains one copy in one process (rank 0 of "
            f"the authors' run), but the job was given {n_gpus} GPUs; set the config's gpu.train to 1"
        )
    if n_gpus > 1 and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if visible < n_gpus:
            raise ValueError(f"launch {job_path}: {n_gpus} GPUs requested but only {visible} visible")
        _run_streaming(launch_command(job_path, n_gpus, job.settings.precision))
        return None
    return train_prompt(job)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sd4match.training <job.json>``: run one training job (each accelerate process runs it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m sd4match.training <job.json>", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    join_gpu_lease()  # accelerate's workers do not inherit the job's lock fds: take a share
    train_prompt(read_job(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
