"""The toy's report: the results table, the loss plot (matplotlib, imported only here) and the renders sheet."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from diffusers.utils import make_image_grid
from PIL import Image

from hdb.toy.world import Person


def results_table(results: dict) -> str:
    methods, n = results["methods"], results["methods"]["base"]["people"]
    steps = results["config"]["finetune_steps"]
    lines = [
        f"Held-out diffusion loss on {results['config']['eval_renders']} other renders x "
        f"{results['config']['eval_draws']} fixed noise/timestep draws per person, {n} held-out people, "
        f"each personalised from one render (seed {results['seed']}"
        f'{", quick" if results["quick"] else ""}). Lower is better; "beats" counts people. "Identified": '
        f"for how many people their own model fits their renders better than all {n - 1} other people's models "
        f"(chance: 1 of {n}); margin: how much better, in % of the base loss (negative: another model fits better).",
        "",
        f"| method | mean loss | vs base | beats base | beats zero init + {steps} steps "
        "| beats control (wrong photo) | identified | margin |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in methods.values():
        identified = "-" if m["identified"] is None else f"{m['identified']}/{n}"
        margin = "-" if m["margin_pct"] is None else f"{m['margin_pct']:+.3f}%"
        lines.append(
            f"| {m['label']} | {m['mean']:.5f} | {m['vs_base_pct']:+.2f}% | {m['beats_base']}/{n} "
            f"| {m['beats_zero_ft']}/{n} | {m['beats_wrong_photo']}/{n} | {identified} | {margin} |"
        )
    if results["guard_stops"]:
        lines += [
            "",
            "train()'s divergence guard stopped these finetunes early (scored at their last good step): "
            f"{results['guard_stops']}",
        ]
    t = results["timings_s"]
    lines += [
        "",
        "Time (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in t.items())
        + f"; {results['torch_threads']} torch thread(s); code {results.get('code', 'not recorded')}.",
    ]
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_losses(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 6), gridspec_kw={"width_ratios": [1, 1, 1.5]})
    pretrain = results["losses"]["pretrain"]
    axes[0].plot(_smooth(pretrain, 25))
    axes[0].set(title="base UNet pre-training (diffusion loss, 25-step mean)", xlabel="step", ylabel="loss")
    hyper, terms = results["losses"]["hypernet"], results["losses"]["hypernet_terms"]
    axes[1].plot(_smooth(hyper, 25), label="alpha * diffusion + beta * weight distance")
    for name, values in terms.items():
        if values:
            axes[1].plot(_smooth(values, 25), linestyle="--", label=name.replace("_", " "))
    axes[1].set(title="hypernetwork training (25-step mean)", xlabel="step", ylabel="loss", yscale="log")
    axes[1].legend(fontsize=8)
    methods = results["methods"]
    names = [name for name in methods if name != "base"]
    base = np.array(methods["base"]["per_person"])
    for i, name in enumerate(names):
        delta = 100 * (np.array(methods[name]["per_person"]) / base - 1)
        axes[2].bar(
            i,
            delta.mean(),
            color="C1" if name.startswith("hyper") else "C2" if name == "upper_bound" else "C0",
            alpha=0.6,
        )
        axes[2].scatter(np.full(len(delta), i), delta, s=10, color="k", zorder=3)
    axes[2].axhline(0, color="grey", linewidth=0.8)
    labels = [textwrap.shorten(methods[n]["label"], 48, placeholder="...") for n in names]
    axes[2].set_xticks(range(len(names)), labels, fontsize=7, rotation=35, ha="right")
    axes[2].set(title="held-out loss vs base model, per person (%)", ylabel="% change (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def renders_sheet(train_people: list[Person], test_people: list[Person]) -> Image.Image:
    """Rows = people: training people's photos, then held-out people's one photo followed by their eval renders."""
    return image_sheet([p.photos for p in train_people] + [p.photos + p.eval_renders for p in test_people])


def image_sheet(rows: list[list[Image.Image]], zoom: int = 2) -> Image.Image:
    """Rows of pictures on one sheet, shorter rows padded with white, enlarged `zoom` times without blurring."""
    columns = max(len(row) for row in rows)
    blank = Image.new("RGB", rows[0][0].size, (255, 255, 255))
    sheet = make_image_grid(
        [tile for row in rows for tile in row + [blank] * (columns - len(row))], rows=len(rows), cols=columns
    )
    return sheet.resize((sheet.width * zoom, sheet.height * zoom), Image.NEAREST)
