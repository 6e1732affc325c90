"""Progressive distillation on the digits: quality vs sampling steps, students against the teacher's DDIM.

An EDM U-Net (model_channels 16; plain EDM as in the paper, or EDM-FDM with --fdm) is trained on
scikit-learn's digits with tasks.train_base, then distilled round by round with tasks.distill_round
(64 -> 32 -> ... -> 1 steps; FDM stops at 2, see fdm_core.distill.check_one_step). Every student, and
the teacher run with DDIM (euler) at the same step counts, is scored by tasks.evaluate: the Fréchet
distance in the features of the small classifier of tasks.train_classifier (trained on the digits train
split), against the train split. The cost side compares the distillation updates and wall time with the
base training's.

    python -m benchmarks.distillation [--quick] [--fdm]

writes benchmarks/results/distillation{,_fdm}{,_quick}.md and .png, and logs them to MLflow.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from benchmarks.common import command, machine, png, write_report
from tasks.registry import STAGES
from tasks.stage import StageContext, StageResult, run_stage
from tasks.stages.distill_round import DistillConfig, DistillRoundConfig
from tasks.stages.evaluate import EvalConfig, SamplerSpec
from tasks.stages.prepare_data import DataConfig
from tasks.stages.train_base import ModelConfig, TrainBaseConfig, TrainConfig
from tasks.stages.train_classifier import ClassifierConfig

SEED = 0


@dataclass(frozen=True)
class Setting:
    """Sizes of one benchmark mode."""

    name: str
    base_steps: int
    start_steps: int
    updates: int
    final_updates: int
    num_samples: int
    classifier_steps: int = 300


MODES = {
    "full": Setting(
        "full", base_steps=3000, start_steps=64, updates=400, final_updates=800, num_samples=1000
    ),
    "quick": Setting("quick", base_steps=600, start_steps=8, updates=100, final_updates=200, num_samples=500),
    # The CI smoke test's: a few steps of everything, to check the machinery and the report, not the claim.
    "tiny": Setting(
        "tiny", base_steps=4, start_steps=4, updates=2, final_updates=2, num_samples=32, classifier_steps=5
    ),
}


@dataclass
class Round:
    steps: int
    updates: int
    seconds: float
    loss: float
    fd: float


def _fd(result: StageResult, steps: int) -> float:
    return result.info["by_sampler"][f"euler{steps}"]["fd"]


def measure(setting: Setting, root: str, threads: int, device: str, fdm: bool) -> dict:
    """The whole benchmark in a scratch store under `root`; returns everything the report needs."""

    def ctx(name: str) -> StageContext:
        return StageContext(root, name, key=name, num_threads=threads, device=device)

    data_cfg = DataConfig(source={"kind": "digits"}, val_fraction=0.1, seed=SEED)
    data = run_stage(STAGES["prepare_data"], data_cfg, ctx("data"))
    dataset = data.output_uri
    clf_cfg = ClassifierConfig(steps=setting.classifier_steps, seed=SEED)
    clf = run_stage(STAGES["train_classifier"], clf_cfg, ctx("classifier"), dataset=dataset)
    classifier = clf.output_uri

    model_cfg = ModelConfig(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    train_cfg = TrainConfig(
        process="edm", fdm=fdm, steps=setting.base_steps, batch_size=128, lr=2e-3, ema_decay=0.995, seed=SEED
    )
    base_cfg = TrainBaseConfig(model=model_cfg, train=train_cfg)
    base = run_stage(STAGES["train_base"], base_cfg, ctx("base"), dataset=dataset)
    base_uri = base.output_uri

    counts = []
    n = setting.start_steps
    while n >= (2 if fdm else 1):  # FDM's gamma(80) ~ 4e-8 blinds a 1-step student
        counts.append(n)
        n //= 2
    eval_cfg = EvalConfig(
        num_samples=setting.num_samples,
        batch_size=250,
        samplers=[SamplerSpec(method="euler", steps=n) for n in counts],
        seed=SEED,
    )
    judged = {"dataset": dataset, "classifier": classifier}
    teacher_eval = run_stage(STAGES["evaluate"], eval_cfg, ctx("eval_base"), model=base_uri, **judged)
    teacher_fd = {n: _fd(teacher_eval, n) for n in counts}

    distill_cfg = DistillConfig(
        updates=setting.updates,
        final_updates=setting.final_updates,
        batch_size=128,
        lr=5e-4,
        checkpoint_every=10**6,
        seed=SEED,
    )
    uri, teacher_steps, rounds = base_uri, setting.start_steps, []
    for k, steps in enumerate(counts[1:], start=1):
        round_cfg = DistillRoundConfig(**distill_cfg.model_dump(), teacher_steps=teacher_steps, round_index=k)
        res = run_stage(STAGES["distill_round"], round_cfg, ctx(f"distill_{k}"), teacher=uri, dataset=dataset)
        ev = run_stage(STAGES["evaluate"], eval_cfg, ctx(f"eval_{k}"), model=res.output_uri, **judged)
        rounds.append(
            Round(
                steps,
                int(res.metrics["updates"]),
                res.metrics["distill_seconds"],
                res.metrics["distill/loss"],
                _fd(ev, steps),
            )
        )
        print(
            f"round {k}: {teacher_steps} -> {steps} steps, FD {rounds[-1].fd:.3f} "
            f"(teacher DDIM {teacher_fd[steps]:.3f}), {rounds[-1].seconds:.0f} s",
            flush=True,
        )
        uri, teacher_steps = res.output_uri, steps

    return {
        "counts": counts,
        "teacher_fd": teacher_fd,
        "rounds": rounds,
        "base_steps": int(base.metrics["steps"]),
        "base_seconds": base.metrics["train_seconds"],
        "classifier_acc": clf.metrics["val_accuracy"],
        "n_train": data.metrics["n_train"],
        "parameters": base.info["parameters"],
    }


def plot(res: dict, title: str) -> bytes:
    """PNG of the teacher's and the students' FD against the number of sampling steps."""
    fig = Figure(figsize=(5.5, 3.8), dpi=120)
    ax = fig.subplots()
    counts = res["counts"]
    ax.plot(counts, [res["teacher_fd"][n] for n in counts], "o-", label="teacher, DDIM (euler)")
    rounds = res["rounds"]
    ax.plot([r.steps for r in rounds], [r.fd for r in rounds], "s-", label="distilled students")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylabel("Fréchet distance, classifier features")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return png(fig, dpi=120)


def report(res: dict, setting: Setting, fdm: bool, cmd: str, total: float, png_name: str) -> str:
    """The Markdown report: set-up, the quality table by step count, cost against base training, reading."""
    rounds, teacher_fd, start = res["rounds"], res["teacher_fd"], res["counts"][0]
    by_steps = {r.steps: r for r in rounds}
    rows = [f"| {start} | {teacher_fd[start]:.3f} | (the teacher) | | | |"]
    for r in rounds:
        t = teacher_fd[r.steps]
        rows.append(f"| {r.steps} | {t:.3f} | {r.fd:.3f} | {r.fd / t:.2f} | {r.updates} | {r.seconds:.0f} |")
    to4 = [r for r in rounds if r.steps >= 4]
    upd_all, sec_all = sum(r.updates for r in rounds), sum(r.seconds for r in rounds)
    upd4, sec4 = sum(r.updates for r in to4), sum(r.seconds for r in to4)
    bs, bsec = res["base_steps"], res["base_seconds"]
    wins = sum(r.fd < teacher_fd[r.steps] for r in rounds)
    reading = (
        f"students beat the teacher's DDIM at the same step count at {wins} of {len(rounds)} step counts"
    )
    if 4 in by_steps:
        reading += (
            f"; the 4-step student's FD is {by_steps[4].fd / teacher_fd[start]:.2f}x the {start}-step "
            f"teacher's, for {upd4 / bs:.2f}x the base model's updates"
        )
    if fdm:
        reading += (
            ". No 1-step round: FDM scales the net input at sigma = 80 by gamma(80) ~ 4e-8, so a 1-step "
            "student could not depend on its noise and distill_round refuses it (check_one_step)"
        )
    process = "EDM-FDM (m 2, warm-up 200)" if fdm else "EDM"
    mode = "" if setting.name == "full" else f" ({setting.name} mode)"
    return "\n".join(
        [
            f"# Progressive distillation on digits, {process} base{mode}",
            "",
            f"Command: `{cmd}` (total {total / 60:.1f} min)  ",
            f"Machine: {machine()}, shared with other work (timings are indicative).  ",
            f"Seeds: data split, classifier, base training, distillation and evaluation noise all {SEED}.  ",
            f"Base model: {process} U-Net (model_channels 16, {res['parameters']:,} parameters), "
            f"{bs} steps at batch 128, lr 2e-3, EMA 0.995 (tasks.train_base).  ",
            f"Distillation (tasks.distill_round): teacher {start} steps on the EDM Karras grid, halved each "
            f"round; {setting.updates} updates per round, {setting.final_updates} for the rounds to 2 and 1 "
            "steps, batch 128, Adam lr 5e-4 annealed linearly to 0, grad clip 1, x-parameterisation (EDM "
            "preconditioned head), truncated-SNR weighting, no EMA.  ",
            "Quality: Fréchet distance (FD) in the 64-d features of the tasks.train_classifier CNN "
            f"(val accuracy {res['classifier_acc']:.3f}), {setting.num_samples} samples vs the "
            f"{res['n_train']:.0f}-image train split, via tasks.evaluate; lower is better. Not Inception "
            "FID: compare trends with the paper, not values. With only 1,797 digits there is no disjoint "
            "real set of the same size to give a floor, so compare rows with each other.",
            "",
            f"![quality vs steps]({png_name})",
            "",
            "| steps | teacher DDIM FD | student FD | student / teacher | updates | distill s |",
            "|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Cost: base training {bs} updates in {bsec:.0f} s; distillation to 4 steps {upd4} updates in "
            f"{sec4:.0f} s ({upd4 / bs:.2f}x the base updates, {sec4 / bsec:.2f}x its wall time); all rounds "
            f"down to {rounds[-1].steps} step(s) {upd_all} updates in {sec_all:.0f} s "
            f"({upd_all / bs:.2f}x, {sec_all / bsec:.2f}x). A distillation update costs two teacher "
            "forward passes more than a training update.",
            "",
            "Paper anchors (Salimans & Ho, CIFAR-10 FID, 50k updates per halving, 100k for 2 and 1 steps): "
            "students 1 step 9.12, 2 -> 4.51, 4 -> 3.00, 8 -> 2.57; DDIM baseline 10 -> 13.36, 20 -> 6.84, "
            "50 -> 4.67; distilling to 4 steps costs no more than training the base model.",
            "",
            f"Reading: {reading}.",
            "",
        ]
    )


def report_name(setting: Setting, fdm: bool) -> str:
    """The report's file name without extension, e.g. distillation_fdm_quick."""
    return "distillation" + ("_fdm" if fdm else "") + ("" if setting.name == "full" else f"_{setting.name}")


def run(setting: Setting, fdm: bool = False, threads: int = 1) -> tuple[str, dict[str, bytes]]:
    """Run the benchmark in a scratch store; the Markdown report and its plot as {file name: PNG bytes}."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        res = measure(setting, root, threads, device, fdm)
    total = time.perf_counter() - t0
    name = report_name(setting, fdm)
    flags = (["--fdm"] if fdm else []) + ([f"--threads {threads}"] if threads != 1 else [])
    cmd = command("distillation", setting.name, *flags)
    text = report(res, setting, fdm, cmd, total, f"{name}.png")
    return text, {
        f"{name}.png": plot(res, f"Progressive distillation on digits, {'EDM-FDM' if fdm else 'EDM'} base")
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 -> 1 steps, short runs (a few minutes)")
    parser.add_argument("--fdm", action="store_true", help="an EDM-FDM base, distilled down to 2 steps")
    # One thread: on a shared 2-core machine two OpenMP threads per process run 10x slower, not faster.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    setting = MODES["quick" if args.quick else "full"]
    text, files = run(setting, args.fdm, args.threads)
    print(text)
    print(f"report: {write_report(report_name(setting, args.fdm), text, files)}")


if __name__ == "__main__":
    main()
