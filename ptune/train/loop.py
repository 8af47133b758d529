"""The training loop: one explicit loop on Accelerate, read top to bottom.

Per optimizer step: the step's examples come from a deterministic plan (ptune.data); they are cut
into `grad_accum` micro-batches, each split across processes; every micro-batch's summed token
loss is divided by the label-token count of the whole step (all micro-batches, all processes), so
the gradient is the same whatever the accumulation or the number of processes; gradients of the
trainable tensors are summed across processes (no DDP wrapper: the backbone is frozen and holds no
gradients); then clip, step, log, evaluate, checkpoint.

Everything the next step depends on -- trainable tensors, optimizer state, RNG, step -- is in the
checkpoint, and the data position is a function of the step, so a resumed run repeats an unbroken
one bit for bit on CPU.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ptune import heads
from ptune.data import collate
from ptune.errors import PtuneError, Stopped
from ptune.rundir import RunDir
from ptune.train import checkpoint as ckpt
from ptune.train.plan import epoch_plan, micro_batches

log = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    max_steps: int
    batch_size: int  # examples per micro-batch per process
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_steps: int
    schedule: str  # linear | cosine | constant
    max_grad_norm: float
    eval_every: int
    save_every: int
    keep_last: int
    log_every: int
    seed: int
    eval_batch_size: int
    group_by_length: bool
    eval_split: str
    head_lr: float | None  # the task head's tensors (head.*) at this peak rate; None: lr (param_groups)
    shard: str | None  # "fsdp": the backbone is sharded, so every process runs the evaluation (ptune.train.shard)


@dataclass
class TrainState:
    step: int = 0
    train_tokens: int = 0
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    last_loss: float | None = None
    first_loss: float | None = None  # the first step's, for the divergence report (job.diverged)
    best: dict | None = None
    history: list = field(default_factory=list)  # eval records, for summary.json

    def to_json(self) -> dict:
        return dict(step=self.step, train_tokens=self.train_tokens, train_time_s=self.train_time_s,
                    wall_time_s=self.wall_time_s, last_loss=self.last_loss, first_loss=self.first_loss,
                    best=self.best, history=self.history)


def lr_at(step: int, args: TrainArgs) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the decay."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * (1 - progress)


def param_groups(names: list[str], args: TrainArgs) -> list[tuple[list[str], float]]:
    """The optimizer's groups as (tensor names, lr scale): everything at trainer.lr, or with
    trainer.head_lr the task head's own tensors (names `head.*`: a linear head, a soft or prototypical
    verbalizer) in a last group at that peak rate, on the same schedule (lr_at x head_lr / lr).
    PtuneError when head_lr is set and the head trains nothing: the key is never accepted and ignored."""
    if args.head_lr is None:
        return [(list(names), 1.0)]
    head = [k for k in names if k.startswith("head.")]
    if not head:
        raise PtuneError(f"trainer.head_lr={args.head_lr} is set, but this task head trains no tensors of its own "
                         f"(a linear head, task.head=soft-verbalizer or proto-verbalizer do); drop trainer.head_lr")
    rest = [k for k in names if not k.startswith("head.")]
    return [*([(rest, 1.0)] if rest else []), (head, args.head_lr / args.lr)]


def peak_memory_mb() -> float:
    """Peak memory since the last reset_peak_memory(): GPU max allocated, else the process's peak RSS
    (Linux VmHWM, which clear_refs resets; getrusage's ru_maxrss where /proc is missing)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere).

    Loading replaces tensors: fp32 weights by bf16 ones (store_frozen), by quantized ones (model.quantize),
    by a process's shard (trainer.shard=fsdp). glibc keeps what they freed in its heap, and the training
    step's allocations of other sizes do not reuse all of it, so without a trim the process holds the
    replaced weights' memory on top of its working set (measured: scripts/bench_plan.py, docs/performance.md)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """glibc's malloc controls, or None where the C library is another (musl, macOS): nothing to ask for."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed instead of rising with what is freed


def fix_mmap_threshold() -> bool:
    """glibc: serve every allocation of 128 KiB or more by mmap from now on, so a freed tensor goes back to the
    OS at once (mallopt M_MMAP_THRESHOLD; nothing on other C libraries). True when set.

    For a sharded backbone on CPU (trainer.shard=fsdp): FSDP gathers every layer's weights before its forward
    and again before its backward and frees them after, each weight smaller than the 32 MiB up to which
    glibc's threshold rises by default; the heap then keeps that churn, and the sharded process peaked 14%
    ABOVE the unsharded one while holding a third less backbone (measured: 8 layers of 61 MB, docs/performance.md).
    With the threshold fixed it peaks 12% below, at +16% time per step. Left as it is when the user's
    environment sets MALLOC_MMAP_THRESHOLD_ (glibc read it at start), and for unsharded runs, where the same
    setting cost 30% time per step for a smaller gain."""
    libc = _glibc()
    if libc is None or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    return libc.mallopt(-3, MMAP_THRESHOLD) == 1  # M_MMAP_THRESHOLD


def reset_peak_memory() -> None:
    """Start a new peak: each job of a sweep (one process) then reports its own, not the sweep's so far.
    On CPU the peak restarts from the memory held now (the loaded model included), as a fresh process
    reaches it too."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
    except OSError:
        pass


def _is_better(value, best: dict | None, key: str, greater: bool) -> bool:
    if not isinstance(value, (int, float)):
        return False
    if best is None:
        return True
    return value > best["metrics"][key] if greater else value < best["metrics"][key]


def check_step_size(n_examples: int, batch_size: int, grad_accum: int, world: int) -> int:
    """Examples per optimizer step; PtuneError if the data cannot fill one (train() asks before it
    claims a run directory)."""
    step_size = batch_size * grad_accum * world
    if n_examples < step_size:
        raise PtuneError(f"{n_examples} training examples are fewer than one step needs ({step_size} = "
                         f"batch_size x grad_accum x processes); lower trainer.batch_size or add data")
    return step_size


def fit(method, task, examples, args: TrainArgs, accelerator, run_dir: Path, resume_from: Path | None = None,
        on_adapter=None, trackers=None) -> TrainState:
    """Train `method` on `examples`; evaluate and checkpoint into run_dir. Returns the final state.

    on_adapter(directory) writes the adapter of the current method into `directory`; trackers
    (ptune.train.trackers.Trackers) get every metrics.jsonl record too.
    """
    run = RunDir(run_dir)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    params = method.trainable_tensors()
    groups = param_groups(list(params), args)
    names = [k for group, _ in groups for k in group]  # the optimizer's own order: its state is saved by name
    optimizer = torch.optim.AdamW([{"params": [params[k] for k in group], "scale": scale} for group, scale in groups],
                                  lr=args.lr, weight_decay=args.weight_decay) if params else None
    pad_id = method.backbone.tokenizer.pad_token_id
    metrics = run.metrics_log()

    def write(record: dict) -> None:  # metrics.jsonl is the source of truth; trackers get the same record
        metrics.write(record)
        if trackers is not None:
            trackers.log(record)

    # fp16 autocast needs loss scaling (bf16 and fp32 do not); its state is part of the checkpoint.
    scaler = torch.amp.GradScaler(device.type) if accelerator.mixed_precision == "fp16" else None

    step_size = check_step_size(len(examples), args.batch_size, args.grad_accum, world)
    steps_per_epoch = len(examples) // step_size
    lengths = [len(e.input_ids) for e in examples]
    n_labels = [e.n_loss_terms() for e in examples]

    state = TrainState()
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved["trainable"][k])
        ckpt.optimizer_from_flat(optimizer, saved["optimizer"], saved["state"]["optimizer"])
        ckpt.set_rng_state(saved["rng"])
        if scaler is not None and saved["state"].get("grad_scaler"):
            scaler.load_state_dict(saved["state"]["grad_scaler"])
        state = TrainState(**{k: v for k, v in saved["state"].items() if k in TrainState.__dataclass_fields__})
        if main:
            metrics.truncate_after(state.step)
        log.info("resumed from %s at step %d", resume_from, state.step)

    def evaluate() -> None:
        method.backbone.model.eval()
        if main or args.shard == "fsdp":  # a sharded backbone runs only with every process (the same batches)
            t0 = time.perf_counter()
            with accelerator.autocast():  # the precision of training (frozen weights may be stored in bf16)
                scores, records = task.evaluate(method, args.eval_split, args.eval_batch_size)
        if main:
            record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "split": args.eval_split,
                      **{f"eval/{k}": v for k, v in scores.items()}, "eval_time_s": round(time.perf_counter() - t0, 2)}
            write(record)
            state.history.append({"step": state.step, "metrics": scores})
            key = task.metric_for_best
            if _is_better(scores.get(key), state.best, key, task.greater_is_better):
                state.best = {"step": state.step, "metrics": scores}
                on_adapter(run.adapter("adapter_best"))
            run.write_predictions(args.eval_split, records, state.step)
            log.info("step %d eval: %s", state.step, _fmt(scores))
        accelerator.wait_for_everyone()

    def save() -> None:
        # never checkpoint a NaN; every process holds the same tensors, so all stop together
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            _stop_non_finite("a trainable tensor became NaN/inf", state.step, run_dir)
        opt_tensors, opt_meta = ckpt.optimizer_to_flat(optimizer, names)
        if not ckpt.finite(opt_tensors):  # Adam's moments overflow before the weights do
            _stop_non_finite("the optimizer state became NaN/inf", state.step, run_dir)
        if main:
            ckpt.save_checkpoint(run.checkpoints, state.step, params, opt_tensors, ckpt.rng_state(),
                                 {**state.to_json(), "optimizer": opt_meta, "steps_per_epoch": steps_per_epoch,
                                  "grad_scaler": scaler.state_dict() if scaler is not None else None,
                                  "data_position": divmod(state.step, steps_per_epoch)}, keep_last=args.keep_last)
        accelerator.wait_for_everyone()

    if not params:  # nothing to train (hard-prompt): evaluate the frozen model once
        evaluate()
        return state

    stop = _StopOnSignal()
    bar = tqdm(total=args.max_steps, initial=state.step, disable=not main, desc="train", mininterval=1.0, dynamic_ncols=True)
    try:
        plan, plan_epoch = None, -1
        t_log, tok_log = time.perf_counter(), 0
        wall_start = time.perf_counter() - state.wall_time_s
        while state.step < args.max_steps:
            t_step = time.perf_counter()
            method.backbone.model.train()  # backbone dropout active, as in the papers' code and PEFT
            epoch, k = divmod(state.step, steps_per_epoch)
            if epoch != plan_epoch:
                plan, plan_epoch = epoch_plan(lengths, step_size, args.seed, epoch, args.group_by_length), epoch
            step_indices = sorted(plan[k], key=lambda i: lengths[i])
            denom = sum(n_labels[i] for i in step_indices)  # label tokens in the whole step, all processes
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, args) * group["scale"]

            loss_total = torch.zeros((), device=device)
            tokens = 0
            for mb in micro_batches(step_indices, args.grad_accum, world, rank):
                batch = {key: t.to(device) if torch.is_tensor(t) else t
                         for key, t in collate([examples[i] for i in mb], pad_id).items()}
                with accelerator.autocast():
                    loss_sum, _ = heads.loss(method, batch)
                scaled = loss_sum / denom
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_total += loss_sum.detach()
                tokens += int(batch["attention_mask"].sum())
            if world > 1:  # sum, not mean: each process already divided by the global token count
                for p in params.values():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                stats = torch.tensor([loss_total.item(), tokens], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(stats)
                loss_total, tokens = stats[0], int(stats[1])
            loss = float(loss_total) / denom
            if not math.isfinite(loss):
                _stop_non_finite(f"training loss became {loss}", state.step + 1, run_dir)
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), args.max_grad_norm) if args.max_grad_norm > 0 else None
            if scaler is not None:
                scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.last_loss = loss
            if state.first_loss is None:
                state.first_loss = loss
            state.train_tokens += tokens
            step_s = time.perf_counter() - t_step
            state.train_time_s += step_s
            tok_log += tokens
            bar.update(1)
            if main and (state.step % args.log_every == 0 or state.step == args.max_steps):
                dt = time.perf_counter() - t_log
                record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), "loss": loss,
                          "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": round(tok_log / max(dt, 1e-9), 1),
                          "step_s": round(step_s, 4)}  # this step alone (forward, backward, update)
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                write(record)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                t_log, tok_log = time.perf_counter(), 0
            if state.step % args.eval_every == 0 or state.step == args.max_steps:
                evaluate()
            state.wall_time_s = time.perf_counter() - wall_start
            if world > 1:  # every process must stop at the same step, or the next all_reduce hangs
                flag = torch.tensor([1.0 if stop.signal else 0.0], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop.signal = stop.signal or ("a signal to another process" if flag.item() else None)
            if state.step % args.save_every == 0 or state.step == args.max_steps or stop.signal:
                save()
            if stop.signal:
                raise Stopped(f"stopped by {stop.signal} at step {state.step}; a checkpoint was saved. Continue with: "
                              f"ptune train resume={run_dir}", stop.signum)
    finally:
        bar.close()  # also on an error, so its line ends before the error's
        stop.restore()
    state.wall_time_s = time.perf_counter() - wall_start
    return state


def _stop_non_finite(what: str, step: int, run_dir: Path):
    """Stop before anything non-finite is saved; the checkpoints already written stay as they are."""
    last = ckpt.latest_usable(RunDir(run_dir).checkpoints)
    if last is None:
        raise PtuneError(f"{what} at step {step}; stopped. No usable checkpoint was written before it (none yet, or "
                         f"none with finite tensors), so there is nothing to resume: start a new run with a lower "
                         f"trainer.lr (or trainer.precision=fp32)")
    raise PtuneError(f"{what} at step {step}; stopped. The last good checkpoint is {last}; lower trainer.lr (or use "
                     f"trainer.precision=fp32) and continue with: ptune train resume={run_dir} trainer.lr=<lower>")


class _StopOnSignal:
    """SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 set a flag; the loop finishes its step, saves a
    checkpoint and stops (`Stopped`, which says the signal). USR1/USR2 are what clusters send
    before a time limit or a preemption (SLURM's --signal; submitit's USR2): in a submitit job
    on SLURM, ptune.train.hydra_app then requeues the job, which resumes from that checkpoint.

    A second signal while saving is left to the handler that was there before (Ctrl-C twice
    kills at once).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.signal = None
        self.signum = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        self.signum = signum
        self.restore()

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def _fmt(scores: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scores.items())
