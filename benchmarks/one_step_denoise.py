"""Can the UNet finish an image it is shown? One-step x0 from noised held-out renders, judged by the checker.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/one_step_denoise.py [--model MODEL] [--n 100] \
        [--category text --category colors] [--timesteps 100,300,500,700] [--grid out.png]

For each render (seed 4242; training uses seed 0): encode it with the VAE, noise the latent to t,
predict x0 in one UNet call with the render's caption, decode and run the scene checker against the
caption. The VAE's own reconstruction is the ceiling. A category that passes at t = 100 far below its
ceiling is one whose fine detail the UNet cannot restore, whatever the sampler does before that step.
"""

import argparse

import numpy as np
import torch
from PIL import Image

import sfumato
from sfumato.data import to_model_range
from sfumato.diffusion import predicted_x0
from sfumato.explain import _train_scheduler
from sfumato.sampling import decode_latents
from sfumato.shapesworld.checker import judge
from sfumato.shapesworld.render import make_scene, render


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=100, help="renders per category")
    ap.add_argument("--category", action="append", default=None)
    ap.add_argument("--timesteps", default="100,300,500,700")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", default=None, help="PNG: render, x0 at each t, reconstruction; 8 rows per category")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = sfumato.load(a.model)
    sched = _train_scheduler(pipe)
    ac = sched.alphas_cumprod
    ts = torch.tensor([int(t) for t in a.timesteps.split(",")])
    sf = pipe.vae.config.scaling_factor
    rows = []
    print(f"{pipe.folder}: {a.n} renders per category, {a.threads} thread(s)")
    for cat in a.category or ["text", "colors"]:
        passed, recon = np.zeros(len(ts)), 0
        for i in range(a.n):
            sc = make_scene(4242, i, (cat,))
            img = render(sc, 64).convert("RGB")
            x = to_model_range(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]).to(pipe.device)
            z0 = pipe.vae.encode(x).latent_dist.mode() * sf
            text, _ = pipe.encode([sc.caption])
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(i)).to(pipe.device)
            noisy = torch.cat([sched.add_noise(z0, noise, t[None]) for t in ts])
            out = pipe.unet(noisy, ts.to(pipe.device), encoder_hidden_states=text.expand(len(ts), -1, -1)).sample
            x0 = predicted_x0(sched.config.prediction_type, noisy, out, ac[ts].view(-1, 1, 1, 1).to(noisy))
            images = [Image.fromarray(d.numpy()) for d in decode_latents(pipe.vae, torch.cat([x0, z0]))]
            passed += [judge(im, sc.caption).passed for im in images[:-1]]
            recon += judge(images[-1], sc.caption).passed
            if a.grid and i < 8:
                rows.append(np.concatenate([np.array(img)] + [np.array(im) for im in images], 1))
        print(f"  {cat:18s} reconstruction {recon / a.n:.2f}  one-step x0: "
              + "  ".join(f"t={t} {p / a.n:.2f}" for t, p in zip(ts.tolist(), passed)))
    if a.grid:
        Image.fromarray(np.concatenate(rows, 0)).resize((2 * rows[0].shape[1], 2 * 64 * len(rows)),
                                                        Image.NEAREST).save(a.grid)


if __name__ == "__main__":
    main()
