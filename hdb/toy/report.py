"""The toy's report: the results table, the loss plot (matplotlib, imported only here) and the renders sheet."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import numpy as np
from diffusers.utils import make_image_grid
from PIL import Image

from hdb.toy.pictures import CONTEXTS, GREY_BELOW, PICTURES
from hdb.toy.scores import MEMORISERS, bootstrap_interval, memoriser_rows, seed_level_interval
from hdb.toy.world import Person, sample_people


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
        if "identified" in m or "per_person" in m:  # the rows measured by diffusion loss
            lines.append("| " + " | ".join([m["label"], *_cells(m, n)]) + " |")
    lines += ["", *picture_table(results)]
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
        + f"; {results['torch_threads']} torch thread(s), {results.get('scoring_workers', 1)} scoring worker(s)"
        + f"; code {results.get('code', 'not recorded')}.",
    ]
    return "\n".join(lines) + "\n"


def picture_table(results: dict) -> list[str]:
    """The pictures' table: what each model draws of each held-out person, judged as the paper's Table 3 judges it."""
    methods, config, prompts = results["methods"], results["config"], results["picture_prompts"]
    n = methods["base"]["people"]
    lines = [
        f"Pictures: each model draws its person {PICTURES} times for each prompt ('{prompts[0]}', '{prompts[1]}'; "
        f"{config['sample_steps']} steps, the same seeds for every model). Identity: the toy's face recogniser "
        "(hdb/toy/pictures.py: a CNN trained on the crowd's renders to read the world's traits) reads each picture; "
        "model k's pictures against person j's renders in the same context (the mean of their traits); identified = "
        f"person j's own model's pictures are nearest (chance: 1 of {n}), AUC with its 95% interval over people. In "
        "context: the share of pictures in the colour asked (colour for the photo prompt, grey for black and white; "
        f"grey = colourfulness under {GREY_BELOW}). Diversity: mean |difference| of two pictures of one prompt "
        "(pixels in [-1, 1]).",
        "",
        "| method | identified, photo | AUC, photo [95% CI] | identified, b&w | AUC, b&w [95% CI] "
        "| in context (photo / b&w) | diversity (photo / b&w) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in methods.values():
        if "pictures" in m:
            lines.append("| " + " | ".join([m["label"], *_picture_cells(m["pictures"], n)]) + " |")
    return lines


def _picture_cells(pictures: dict, n: int) -> list[str]:
    cells = []
    for context in CONTEXTS:
        if context in pictures:
            found = pictures[context]
            low, high = found["auc_interval"]
            cells += [f"{found['identified']}/{n}", f"{found['auc']:.3f} [{low:.3f}, {high:.3f}]"]
        else:
            cells += ["-", "-"]
    return cells + [" / ".join(f"{100 * v:.0f}%" for v in pictures["in_context"]),
                    " / ".join(f"{v:.3f}" for v in pictures["diversity"])]  # fmt: skip


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


def code_version(of: str = "HEAD") -> str:
    """The git commit this code is at (with "+changes" when hdb's code differs from it), or hdb's version.
    `of`="HEAD:./": the hdb package's own tree instead, the same at every commit that leaves hdb's code alone.

    Only the package counts: results other runs write into the checkout (docs/toy/seed*) are not code."""
    package = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", of], cwd=package, capture_output=True, text=True)
        changed = subprocess.run(["git", "status", "--porcelain", "."], cwd=package, capture_output=True, text=True)
    except OSError:  # no git
        commit = None
    if commit is None or commit.returncode != 0:
        from hdb import __version__

        return f"hdb {__version__}"
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def _smooth(values: list[float], window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_losses(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 6), gridspec_kw={"width_ratios": [1, 1, 1.5]})
    for name, what in (("vae", "VAE (colour-weighted L1 + L2)"), ("pretrain", "UNet (diffusion loss)")):
        if results["losses"].get(name):  # runs with the tiny pipeline's random VAE trained none
            axes[0].plot(_smooth(results["losses"][name], 25), label=what)
    axes[0].set(title="the base: VAE, then UNet (25-step mean)", xlabel="step", ylabel="loss", yscale="log")
    axes[0].legend(fontsize=8)
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
    text = summary_table([with_memorisers(run) for run in runs])
    (Path(folder) / "summary.md").write_text(text)
    return text


def with_memorisers(run: dict) -> dict:
    """`run` with every memorising baseline's row (hdb.toy.scores.MEMORISERS). A run made before a baseline was a
    row gets it recomputed from its seed's world: the baselines compare pixels and need no model. The world is checked
    to be the run's: the same held-out people, and the same matrix for the baseline the run has."""
    if all(name in run["methods"] for name in MEMORISERS):
        return run
    config = run["config"]
    test = sample_people(
        run["seed"], 2, config["test_identities"], 1, config["eval_renders"], "test", config["upper_bound_renders"]
    )
    rows = memoriser_rows(test)
    same_people = [p.identity.name for p in test] == run["held_out"]
    if not same_people or rows["pixel_nn"]["matrix"] != run["methods"]["pixel_nn"]["matrix"]:
        raise ValueError(f"seed {run['seed']}'s world is not the one its results were made in: cannot add the rows")
    return {**run, "methods": rows | run["methods"], "memorisers_recomputed": True}


# Paired comparisons the summary reports: (method, against, what the difference isolates)
COMPARISONS = (
    ("hyper_ft_lidb", "hyper_ft_lora", "relaxation with the hypernetwork: lidb - lora"),
    ("zero_ft_long_lidb", "zero_ft_long_lora", "relaxation from zero (200 steps): lidb - lora"),
    ("hyper_ft_lora_trained", "hyper_ft_lora", "training the prediction too, free (lora)"),
    ("hyper_ft_lidb", "hyper_ft_lidb_frozen", "training the prediction too, confined (lidb)"),
    ("hyper_ft_lidb_frozen", "hyper_ft_lora", "confining to the aux bases, prediction frozen"),
    ("hyper_ft_lidb", "hyper_ft_lora_trained", "confining to the aux bases, prediction trained"),
    ("hyper_ft_lora", "zero_ft_long_lora", "hypernetwork + fast finetune - zero + long finetune (users today)"),
    ("zero_ft", "zero_ft_long_lora", "fewer steps from zero: 40 - 200 (lora)"),
    ("hyper_ft_lora", "dreambooth_lora", "hypernetwork + fast finetune - DreamBooth-LoRA"),
    ("hyper_ft_lora", "zero_ft", "hypernetwork + fast finetune - zero + fast finetune (the paper's No Hyper)"),
    ("hyper", "hyper_wrong", "the prediction from the person's photo - from another's"),
    ("hyper_ft_lora", "pixel_nn", "hypernetwork + fast finetune - the photo's pixels (memorising)"),
    ("upper_bound", "pixel_nn", "upper bound (8 renders) - the photo's pixels (memorising)"),
    ("hyper_ft_lora", "pixel_nn_standardised", "hypernetwork + fast finetune - the photo's light-normalised pixels"),
    ("upper_bound", "pixel_nn_standardised", "upper bound (8 renders) - the photo's light-normalised pixels"),
    ("hyper_ft_lora", "photo_copy", "hypernetwork + fast finetune - the photo itself (pictures only)"),
    ("upper_bound", "photo_copy", "upper bound (8 renders) - the photo itself (pictures only)"),
    ("hyper_s1", "hyper", "the paper's k=1: a network trained with s=1 - hdb's s=4"),
    ("hyper_k1", "hyper", "the paper's k=1 read on hdb's network: 1 iteration - 4"),
    ("hyper_beta0", "hyper", "the paper's beta=0: the diffusion loss alone - with the weight term"),
    ("hyper_paper_loss", "hyper", "the paper's raw L2 weight loss - hdb's dense distance"),
    ("hyper_zero_start", "hyper", "the paper's zero start - hdb's LoRA-like start"),
    ("hyper_concatenated", "hyper", "the paper's concatenated input - hdb's cross-attention"),
    ("hyper_paper_loss_ft_lora", "hyper_ft_lora", "the same + fast finetune: raw L2 - dense"),
    ("hyper_zero_start_ft_lora", "hyper_ft_lora", "the same + fast finetune: zero start - LoRA-like"),
    ("hyper_concatenated_ft_lora", "hyper_ft_lora", "the same + fast finetune: concatenated - cross-attention"),
    ("hyper_paper_recipe", "hyper", "the paper's recipe, beta 1 - hdb's"),
    ("hyper_paper_recipe_b01", "hyper", "the paper's recipe, beta 0.1 - hdb's"),
    ("hyper_paper_recipe_b001", "hyper", "the paper's recipe, beta 0.01 - hdb's"),
    ("hyper_paper_recipe_ft_lora", "hyper_ft_lora", "the same + fast finetune: the paper's recipe, beta 1 - hdb's"),
    (
        "hyper_paper_recipe_b01_ft_lora",
        "hyper_ft_lora",
        "the same + fast finetune: the paper's recipe, beta 0.1 - hdb's",
    ),
    (
        "hyper_paper_recipe_b001_ft_lora",
        "hyper_ft_lora",
        "the same + fast finetune: the paper's recipe, beta 0.01 - hdb's",
    ),
)


def summary_table(runs: list[dict]) -> str:
    """All seeds pooled: each method's identification (per seed and pooled; intervals over people, and over seeds then
    people), and the paired differences of COMPARISONS with their intervals (one that excludes 0 is a difference)."""
    seeds = ", ".join(str(run["seed"]) for run in runs)
    which = f"seeds {seeds} pooled" if len(runs) > 1 else f"seed {seeds}"
    pooled = _Pooled(runs)
    lines = [
        f"The toy, {which}: {pooled.people} held-out people in all ({runs[0]['methods']['base']['people']} "
        "per seed), each personalised from one render. Identified: per seed, then in all. AUC and margin: means "
        "over every (seed, person), with 95% bootstrap intervals resampling the people; AUC, seeds too: resampling "
        "the seeds, then the people within each (each seed trained its own base and hypernetworks, so this one holds "
        "the training's variance too). r, pixels: the correlation, person by person, of the method's AUC with the raw "
        "memorising baseline's (how much its successes follow the photo's light resembling the scoring renders'). "
        "Editability in % vs the base (lower is better). Each seed's own table: seed*/results.md.",
        "",
        "| method | identified | mean rank | AUC [95% CI] | AUC, seeds too | r, pixels | margin [95% CI] "
        "| other people (photo / b&w) | person in b&w |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(  # the rows measured by diffusion loss (the photo copied is judged on pictures alone)
            pooled.method_row(name)
            for name in pooled.names
            if pooled.has(name, "auc_per_person") or pooled.has(name, "per_person")
        ),
        "",
        "Paired differences, the same people under both methods (AUC in absolute terms; margin and the person in "
        "black and white in % of the base loss):",
        "",
        "| difference | AUC [95% CI] | AUC, seeds too | margin [95% CI] | person in b&w [95% CI] |",
        "| --- | --- | --- | --- | --- |",
        *(
            pooled.difference_row(name, against, what)
            for name, against, what in COMPARISONS
            if pooled.has(name, "auc_per_person") and pooled.has(against, "auc_per_person")
        ),
    ]
    if all("pictures" in run["methods"]["base"] for run in runs):  # runs made before the toy drew pictures have none
        lines += ["", *pooled.picture_lines()]
    codes = sorted({run.get("code", "not recorded") for run in runs})
    recomputed = [str(run["seed"]) for run in runs if run.get("memorisers_recomputed")]
    lines += [
        "",
        f"{pooled.intervals} intervals in all, each at 95%: about one in 20 of those whose true value is 0 excludes 0 "
        "by chance, so a single interval just clear of 0 is a lead to test again, not a finding.",
        "",
        f"Code of the runs: {', '.join(codes)}; summarised at {code_version()}; time per seed (s): "
        f"{[run['timings_s']['total'] for run in runs]}."
        + (
            f" The light-normalised memorising baseline of seeds {', '.join(recomputed)} was recomputed from each "
            "seed's world (it needs no model) by the summarising code, its world checked against the run's."
            if recomputed
            else ""
        ),
    ]
    return "\n".join(lines) + "\n"


class _Pooled:
    """The seeds' runs pooled: a method's figures per seed or over every (seed, person), its table cells, and how many
    intervals the cells show (`intervals`)."""

    def __init__(self, runs: list[dict]) -> None:
        self.runs, self.intervals = runs, 0
        self.names = [name for name in runs[0]["methods"] if all(name in run["methods"] for run in runs)]
        self.people = sum(run["methods"]["base"]["people"] for run in runs)

    def has(self, name: str, key: str) -> bool:
        """Whether method `name` is in every run with the figure `key` ("a/b" for row["a"]["b"])."""
        rows = [run["methods"].get(name) for run in self.runs]
        return all(row is not None and _figure(row, key) is not None for row in rows)

    def per_seed(self, name: str, key: str) -> list[np.ndarray]:
        return [np.asarray(_figure(run["methods"][name], key)) for run in self.runs]

    def pooled(self, name: str, key: str) -> np.ndarray:
        return np.concatenate(self.per_seed(name, key))

    def interval(self, values: np.ndarray, style: str, unit: str = "") -> str:
        """The mean of `values` with its interval over (seed, person) pairs."""
        self.intervals += 1
        return _with_interval(values, bootstrap_interval(values), style, unit)

    def both_intervals(self, values: list[np.ndarray], style: str) -> list[str]:
        """The mean of the seeds' `values` with its interval over (seed, person) pairs; then over seeds, then people."""
        self.intervals += 1
        return [self.interval(np.concatenate(values), style), _interval(seed_level_interval(values), style)]

    def method_row(self, name: str) -> str:
        runs, m = self.runs, self.runs[0]["methods"][name]
        cells = [m["label"]]
        if "identified" in m:
            counts = [run["methods"][name]["identified"] for run in runs]
            auc = self.pooled(name, "auc_per_person")
            cells += [
                f"{' + '.join(map(str, counts))} = {sum(counts)}/{self.people}",
                f"{np.mean([run['methods'][name]['mean_rank'] for run in runs]):.1f}",
                *self.both_intervals(self.per_seed(name, "auc_per_person"), ".3f"),
                "-"
                if name == "pixel_nn"
                else f"{np.corrcoef(self.pooled('pixel_nn', 'auc_per_person'), auc)[0, 1]:+.2f}",
            ]
        else:
            cells += ["-", "-", "-", "-", "-"]
        has_margin = "margin_per_person" in m
        cells.append(self.interval(self.pooled(name, "margin_per_person"), "+.3f", "%") if has_margin else "-")
        if "other_people_pct" in m:
            drift = np.mean([run["methods"][name]["other_people_pct"] for run in runs], axis=0)
            in_context = self.pooled(name, "in_context_per_person").mean()
            cells += [" / ".join(f"{d:+.2f}%" for d in drift), f"{in_context:+.2f}%"]
        else:
            cells += ["-", "-"]
        return "| " + " | ".join(cells) + " |"

    def difference_row(self, name: str, against: str, what: str) -> str:
        ours, theirs = self.per_seed(name, "auc_per_person"), self.per_seed(against, "auc_per_person")
        cells = [what, *self.both_intervals([a - b for a, b in zip(ours, theirs, strict=True)], "+.3f")]
        for key, style, unit in (("margin_per_person", "+.3f", "%"), ("in_context_per_person", "+.2f", "%")):
            if key not in self.runs[0]["methods"][against]:  # the pixel baselines have an AUC only
                cells.append("-")
                continue
            cells.append(self.interval(self.pooled(name, key) - self.pooled(against, key), style, unit))
        return "| " + " | ".join(cells) + " |"

    def picture_lines(self) -> list[str]:
        """The pictures' table, seeds pooled, and the paired differences of their identification (`COMPARISONS`)."""
        lines = [
            "Pictures (each seed's results.md says how they are judged): identified per seed, then in all; AUC over "
            "every (seed, person) with intervals over people, and over seeds then people; in context: the share of "
            "pictures in the colour asked; diversity: mean |difference| of two pictures of one prompt.",
            "",
            "| method | identified, photo | AUC, photo [95% CI] | seeds too | identified, b&w | AUC, b&w [95% CI] "
            "| seeds too | in context (photo / b&w) | diversity (photo / b&w) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in self.names:
            if not self.has(name, "pictures/in_context"):
                continue
            cells = [self.runs[0]["methods"][name]["label"]]
            for context in CONTEXTS:
                if self.has(name, f"pictures/{context}/auc_per_person"):
                    counts = [run["methods"][name]["pictures"][context]["identified"] for run in self.runs]
                    cells.append(f"{' + '.join(map(str, counts))} = {sum(counts)}/{self.people}")
                    cells += self.both_intervals(self.per_seed(name, f"pictures/{context}/auc_per_person"), ".3f")
                else:
                    cells += ["-", "-", "-"]
            for key, style in (("in_context_per_person", "percent"), ("diversity_per_person", ".3f")):
                means = np.concatenate(self.per_seed(name, f"pictures/{key}")).mean(axis=0)
                cells.append(" / ".join(f"{100 * v:.0f}%" if style == "percent" else f"{v:{style}}" for v in means))
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Paired differences of the pictures' identification, the same people under both methods (AUC):",
            "",
            "| difference | photo [95% CI] | seeds too | b&w [95% CI] | seeds too |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, against, what in COMPARISONS:
            keys = [f"pictures/{context}/auc_per_person" for context in CONTEXTS]
            if all(self.has(method, key) for method in (name, against) for key in keys):
                cells = [what]
                for key in keys:
                    ours, theirs = self.per_seed(name, key), self.per_seed(against, key)
                    cells += self.both_intervals([a - b for a, b in zip(ours, theirs, strict=True)], "+.3f")
                lines.append("| " + " | ".join(cells) + " |")
        return lines


def _figure(row: dict, key: str) -> object:
    """row[key], or for "a/b/c" row["a"]["b"]["c"]; None where there is no such figure."""
    for part in key.split("/"):
        if not isinstance(row, dict) or part not in row:
            return None
        row = row[part]
    return row


def _interval(interval: tuple[float, float], style: str) -> str:
    low, high = interval
    return f"[{low:{style}}, {high:{style}}]"


def _with_interval(values: np.ndarray, interval: tuple[float, float], style: str, unit: str = "") -> str:
    low, high = interval
    return f"{values.mean():{style}}{unit} [{low:{style}}, {high:{style}}]"
