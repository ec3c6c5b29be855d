"""The toy's report: the results table, the loss plot (matplotlib, imported only here) and the renders sheet."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from diffusers.utils import make_image_grid
from PIL import Image

from hdb.toy.world import Person


def results_table(results: dict) -> str:
    methods, config = results["methods"], results["config"]
    n = methods["base"]["people"]
    lines = [
        f"{n} held-out people, each personalised from one render (seed {results['seed']}"
        f"{', quick' if results['quick'] else ''}), scored by the diffusion loss on {config['eval_renders']} other "
        f"renders x {config['eval_draws']} fixed noise/timestep draws. Identification: every person's renders under "
        f"every person's model; identified = their own model fits best (chance: 1 of {n}); rank among {n} models "
        "(1 best); AUC = share of the other models their own one beats (chance 0.5), 95% bootstrap interval over "
        "people; margin = own model's lead over the best other, in % of the base loss. Editability: loss on "
        f"{config['other_people']} other people, in both contexts the base knows (photo / black and white), and on "
        'the person in black and white ("a black and white photo of a sks face"), in % vs the base model '
        "(lower is better; the photo was in colour).",
        "",
        "| method | own loss vs base | identified | mean rank | AUC [95% CI] | margin | other people (photo / b&w) "
        "| person in b&w |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in methods.values():
        lines.append("| " + " | ".join([m["label"], *_cells(m, n)]) + " |")
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


def _cells(m: dict, n: int) -> list[str]:
    """A method's cells in the table's columns ("-" where it has no such figure)."""
    has = "identified" in m
    low, high = m["auc_interval"] if has else (0, 0)
    drift = m.get("other_people_pct")
    return [
        f"{m['vs_base_pct']:+.2f}%" if "vs_base_pct" in m else "-",
        f"{m['identified']}/{n}" if has else "-",
        f"{m['mean_rank']:.1f}" if has else "-",
        f"{m['auc']:.3f} [{low:.3f}, {high:.3f}]" if has else "-",
        f"{m['margin_pct']:+.3f}%" if "margin_pct" in m else "-",
        " / ".join(f"{d:+.2f}%" for d in drift) if drift else "-",
        f"{m['in_context_pct']:+.2f}%" if "in_context_pct" in m else "-",
    ]


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
    names = [name for name in methods if name != "base" and "per_person" in methods[name]]
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


def summarise_seeds(folder: Path) -> str:
    """Combine `folder`/seed*/results.json into `folder`/summary.md (returned too); written by `summary_table`."""
    import json

    runs = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("seed*/results.json"))]
    if not runs:
        raise FileNotFoundError(f"No {folder}/seed*/results.json to combine")
    text = summary_table(runs)
    (Path(folder) / "summary.md").write_text(text)
    return text


def summary_table(runs: list[dict]) -> str:
    raise NotImplementedError  # written while the seeds run
