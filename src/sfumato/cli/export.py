"""`sfumato export`: a model's UNets and VAE decoder as ONNX graphs (MODEL/onnx), for fast CPU sampling.

    sfumato export models/mine
    sfumato export models/mine --graphs unet_lcm,vae_decoder     # only what its default sampler runs
"""

from __future__ import annotations

from pathlib import Path

import typer

from .console import out

app = typer.Typer()


@app.command("export")
def export_cmd(
    model: Path = typer.Argument(..., help="The model folder (diffusers Stable Diffusion layout)."),
    graphs: str = typer.Option("", "--graphs", help="Comma-separated: unet, unet_lcm, vae_decoder (default: all "
                               "the model has); the others then run in PyTorch."),
) -> None:
    """Export the UNet(s) and VAE decoder to ONNX beside the model; sfumato then samples with ONNX Runtime on a CPU."""
    from ..export import export

    path = export(model, [g.strip() for g in graphs.split(",") if g.strip()] or None)
    out.print(f"ONNX graphs: {path} (used by generate, eval and serve on a CPU; rebuilt by running this again)")
