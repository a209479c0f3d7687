"""`sfumato tune`: the few-step UNet trained on the scene checker's verdicts of its own samples.

    sfumato tune MODEL --out MODEL-tuned --steps 300
    sfumato tune MODEL --in-place --categories position,counting
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import out

app = typer.Typer()


@app.command("tune")
def tune_cmd(
    model: Path = typer.Argument(..., help="A model folder with a few-step UNet (sfumato distill --attach)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Write a tuned copy of MODEL here."),
    in_place: bool = typer.Option(False, "--in-place", help="Replace MODEL's few-step UNet instead (at the end)."),
    steps: int = typer.Option(300, "--steps", help="Policy updates."),
    prompts: int = typer.Option(8, "--prompts", help="ShapesWorld prompts drawn per update."),
    group: int = typer.Option(8, "--group", help="Samples per prompt, half of them mirrored (even); "
                              "with --objective mean, starting noises per relation variant."),
    categories: str = typer.Option("position", "--categories", help="Comma-separated evaluation categories whose "
                                   "prompts are drawn."),
    lr: float = typer.Option(1e-4, "--lr"),
    partial: float = typer.Option(0.5, "--partial", help="Reward for the right objects with the relation wrong."),
    kl: float = typer.Option(0.0, "--kl", help="Weight of each step's divergence from the starting UNet."),
    objective: str = typer.Option("policy", "--objective", help="policy: the policy gradient on the verdicts; "
                                  "repair: preferences for repaired copies of samples with only the relation "
                                  "wrong, and for passing samples over failed ones (Diffusion-DPO); mean: the "
                                  "first step's average over noises made the mean of the prompt's renders."),
    beta: float = typer.Option(2000.0, "--beta", help="Preference strength of the repair objective."),
    pool: int = typer.Option(256, "--pool", help="Training prompts of the mean objective."),
    renders: int = typer.Option(16, "--renders", help="Renders per relation averaged into each prompt's means "
                                "(mean objective)."),
    gain: float = typer.Option(4.0, "--gain", help="The relation's contrast asked of the first step, in multiples "
                               "of the data's (mean objective)."),
    position_input: bool = typer.Option(False, "--position-input", help="First grow the few-step UNet's input "
                                        "convolution so that every cell reads where it is (plain diffusers keys "
                                        "center_input_sample and conv_in_kernel)."),
    tower_lr: float = typer.Option(0.0, "--tower-lr", help="Train the text tower along at this learning rate "
                                   "(0: frozen). The full-step UNet then reads the new tower as well."),
    reach: float = typer.Option(0.0, "--reach", help="With --tower-lr: weight of a term that asks the tower to "
                                "carry a prompt's relation into the words after it."),
    no_mirror: bool = typer.Option(False, "--no-mirror", help="Independent noise for every sample of a group."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts and noise drawn."),
    resume: bool = typer.Option(False, "--resume", help="Continue an unfinished run from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder or unfinished run."),
) -> None:
    """Tune a few-step model on ShapesWorld prompts: the scene checker's verdicts (group-relative policy
    gradient, or preferences for repaired samples), or the first step's average matched to the data's."""
    from ..reward_tuning import TuneCfg, tune

    cfg = TuneCfg(steps=steps, prompts=prompts, group=group, lr=lr, partial=partial, kl=kl, mirror=not no_mirror,
                  objective=objective, beta=beta, pool=pool, renders=renders, gain=gain, position_input=position_input,
                  seed=seed, tower_lr=tower_lr, reach=reach,
                  categories=tuple(c.strip() for c in categories.split(",") if c.strip()))
    path = tune(model, out_dir, cfg, in_place=in_place, resume=resume, overwrite=overwrite)
    out.print(f"tuned few-step UNet in {path}")
    if (Path(model) / "onnx").is_dir():  # graphs of the old weights: left out of a copy, stale in place
        out.print(f"for the ONNX Runtime path, `sfumato export {Path(model) if in_place else path}` makes its graphs")
