"""Build the paper's figures from pipeline outputs: Fig. 3a/3b tables + plots, Fig. 4/5 generations, matches.

Each ``make_*`` function is what a Snakemake figure rule calls; it reads summaries, prompts and caches,
writes PNG + PDF (and the figure's table as CSV + Markdown where it has one) and a provenance sidecar
``<png>.provenance.json`` (``provenance_path``), all declared outputs of the rule. Prompts and caches are
checked against the model records the figure uses before any work (``evaluation.check_prompt_models``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sd4match.caches import DinoCache, open_dino_cache
from sd4match.data_sources import read_location
from sd4match.datasets import read_pairs_table
from sd4match.evaluation import (
    ConditionalFeatures,
    MatchingSettings,
    check_prompt_models,
    conditional_pair_features,
    predict_pair,
)
from sd4match.features import SDFeaturizer
from sd4match.figures import (
    fig3a_cpm_ablation,
    fig3b_timesteps,
    match_panel,
    prompt_generation_grid,
    qualitative_matches,
    timestep_rows,
)
from sd4match.generation import (
    GenerationSettings,
    class_prompt_images,
    cpm_prompt_images,
    fig4_rows,
    fig5_rows,
)
from sd4match.io import write_json_atomic
from sd4match.models import load_stable_diffusion, read_model_record
from sd4match.prompt_learning import load_prompt
from sd4match.reporting import Provenance
from sd4match.table_writing import write_table


def provenance_path(png: str | Path) -> Path:
    """The provenance sidecar of a figure: ``<png>.provenance.json``."""
    return Path(f"{png}.provenance.json")


def _sidecar(png: str | Path, prov: Provenance, what: str) -> None:
    """Provenance of a figure beside its PNG (config hash, models, code version, demo flag, protocol)."""
    write_json_atomic(provenance_path(png), {"figure": what, **prov.__dict__})


@dataclass(frozen=True)
class TableFigureFiles:
    """What a figure with a table writes: the plot (PNG, PDF), its table (CSV, Markdown) and, when given, the
    table's standalone HTML page and its report caption."""

    png: str
    pdf: str
    csv: str
    md: str
    html: str | None = None
    caption: str | None = None

    @classmethod
    def from_rule(cls, outputs: Any) -> TableFigureFiles:
        """From a figure rule's named outputs ``png``, ``pdf``, ``csv``, ``md`` and optional ``html``,
        ``caption``."""
        return cls(
            outputs.png, outputs.pdf, outputs.csv, outputs.md, outputs.get("html"), outputs.get("caption")
        )

    def write_table(self, table: pd.DataFrame, title: str, prov: Provenance, notes: Sequence[str]) -> None:
        """The table in every form this figure writes (``table_writing.write_table``)."""
        write_table(table, self.csv, self.md, title, prov, self.html, self.caption, notes)


Annotate = Callable[[pd.DataFrame], pd.DataFrame]


def make_fig3a(
    summary_paths: dict[str, str],
    matching: str,
    files: TableFigureFiles,
    prov: Provenance,
    annotate: Annotate | None = None,
    notes: Sequence[str] = (),
) -> pd.DataFrame:
    """Fig. 3a: PCK@0.1 on SPair-71k of the six CPM conditioning cases, ours beside the paper's.
    ``annotate`` adds columns to the written table (intervals, paired differences); ``notes`` go under it."""
    summaries = {int(case): pd.read_csv(path) for case, path in summary_paths.items()}
    table = fig3a_cpm_ablation(summaries, files.png, files.pdf, prov.demo, matching)
    table = table if annotate is None else annotate(table)
    files.write_table(table, "Fig. 3a — CPM conditioning ablation, SPair-71k PCK@0.1", prov, notes)
    _sidecar(files.png, prov, "fig3a")
    return table


@dataclass(frozen=True)
class TimestepCurves:
    """Fig. 3b's two curves: summary files by timestep of SD4Match and of the DIFT baseline, their labels,
    and each one's matching (SD4Match's reported matching, the zero-shot tables' matching)."""

    sd4match: dict[int, str]
    baseline: dict[int, str]
    labels: tuple[str, str]
    matching: tuple[str, str]


def make_fig3b(
    curves: TimestepCurves,
    files: TableFigureFiles,
    prov: Provenance,
    annotate: Annotate | None = None,
    notes: Sequence[str] = (),
) -> pd.DataFrame:
    """Fig. 3b: PCK@0.1 on SPair-71k over the timestep grid, SD4Match vs the DIFT baseline.

    Each curve is scored as its method's tables score it (SD4Match kernel-softmax, DIFT nearest neighbour,
    so DIFT at t=261 is Table 2's DIFT number) and drawn dashed with the other matching too.
    """
    ours, baseline = curves.matching
    labels = curves.labels
    matchings = {labels[0]: [ours, baseline], labels[1]: [baseline, ours]}
    summaries = {(labels[0], int(t)): pd.read_csv(p) for t, p in curves.sd4match.items()}
    summaries |= {(labels[1], int(t)): pd.read_csv(p) for t, p in curves.baseline.items()}
    rows = timestep_rows(summaries, matchings)
    table = fig3b_timesteps(rows, files.png, files.pdf, prov.demo)
    table = table if annotate is None else annotate(table)  # intervals, seed spread (as make_fig3a)
    files.write_table(table, "Fig. 3b — PCK@0.1 on SPair-71k by timestep", prov, notes)
    _sidecar(files.png, prov, "fig3b")
    return table


def generation_settings(cfg: dict[str, Any]) -> GenerationSettings:
    """GenerationSettings from the config's ``figures.generation`` block."""
    return GenerationSettings(
        n_images=cfg["n_images"],
        steps=cfg["steps"],
        guidance_scale=cfg["guidance_scale"],
        seed=cfg["seed"],
        height=cfg["size"],
        width=cfg["size"],
    )


def make_fig4(
    prompt_path: str,
    sd_record: str,
    categories: list[str],
    gen: dict,
    png: str,
    pdf: str,
    prov: Provenance,
    device: str,
) -> None:
    """Fig. 4: images SD generates from the learned SD4Match-Class prompts of selected categories."""
    check_prompt_models(prompt_path, sd_record)
    components = load_stable_diffusion(read_model_record(sd_record).local_path, device=device)
    images = class_prompt_images(prompt_path, components, categories, generation_settings(gen))
    prompt_generation_grid(
        fig4_rows(images),
        png,
        pdf,
        title="Fig. 4 — images generated from learned SD4Match-Class prompts",
        caption=f"prompt: {prompt_path}; {gen['steps']} DDIM steps, guidance {gen['guidance_scale']}",
        demo=prov.demo,
    )
    _sidecar(png, prov, "fig4")


@dataclass(frozen=True)
class PairFigureInputs:
    """What the per-pair (CPM) figures read: the prompt, the SD and DINOv2 model records, the test split's
    DINOv2 cache, its pairs table and dataset location, and how many of its first pairs to show."""

    prompt: str
    sd_record: str
    dino_record: str
    dino_cache: str
    pairs: str
    location: str
    n_pairs: int

    @classmethod
    def from_rule(cls, inputs: Any, params: Any) -> PairFigureInputs:
        """From a figure rule's named inputs (``prompt``, ``sd_model``, ``dinov2_model``, ``dino_cache``,
        ``pairs``, ``data``) and ``params.n_pairs`` (rules/figures.smk)."""
        return cls(
            inputs.prompt,
            inputs.sd_model,
            inputs.dinov2_model,
            inputs.dino_cache,
            inputs.pairs,
            inputs.data,
            int(params.n_pairs),
        )

    def load(self, device: str) -> tuple[Any, pd.DataFrame, DinoCache, str]:
        """SD components, the first pairs, DINOv2 tokens and dataset root, the prompt and the DINOv2 cache
        checked against the model records first."""
        check_prompt_models(self.prompt, self.sd_record, self.dino_record)
        dino = open_dino_cache(self.dino_cache, self.dino_record)
        components = load_stable_diffusion(read_model_record(self.sd_record).local_path, device=device)
        pairs = read_pairs_table(self.pairs).head(self.n_pairs)
        return components, pairs, dino, read_location(self.location).root


def make_fig5(inputs: PairFigureInputs, gen: dict, png: str, pdf: str, prov: Provenance, device: str) -> None:
    """Fig. 5: images SD generates from the CPM prompts of selected pairs, next to the pair."""
    components, pairs, dino, root = inputs.load(device)
    generations = cpm_prompt_images(inputs.prompt, components, dino, pairs, generation_settings(gen))
    prompt_generation_grid(
        fig5_rows(generations, root),
        png,
        pdf,
        title="Fig. 5 — images generated from SD4Match-CPM prompts of image pairs",
        caption=f"prompt: {inputs.prompt}; columns: source, target, generated",
        demo=prov.demo,
    )
    _sidecar(png, prov, "fig5")


@dataclass(frozen=True)
class QualitativeSettings:
    """How the qualitative figure matches its pairs: the evaluation's timestep / ensemble / pair batch, the
    matching config (reported method, kernel sigma, temperature), the image size and the noise seed."""

    evaluation: dict
    matching: dict
    image_size: int
    seed: int


def make_qualitative(
    inputs: PairFigureInputs,
    settings: QualitativeSettings,
    png: str,
    pdf: str,
    prov: Provenance,
    device: str,
) -> None:
    """Predicted (SD4Match-CPM, reported matching) vs ground-truth matches on the first few test pairs."""
    components, pairs, dino, root = inputs.load(device)
    module, _ = load_prompt(inputs.prompt, components.text_encoder, components.tokenizer)
    featurizer = SDFeaturizer(components, device=device)
    evaluation, matching, image_size = settings.evaluation, settings.matching, settings.image_size
    method = matching["reported"]
    matching_settings = MatchingSettings.from_config(matching, image_size, (0.1,), methods=(method,))
    source = ConditionalFeatures(
        module.to(device).eval(),
        featurizer,
        dino,
        root,
        image_size,
        evaluation["timestep"],
        evaluation["ensemble"],
        settings.seed,
        evaluation["pair_batch"],
    )
    features = conditional_pair_features(pairs, source)
    panels = []
    with torch.no_grad():
        for row, src_feat, trg_feat in features:
            pred = predict_pair(row, src_feat, trg_feat, matching_settings)[method]
            panels.append(match_panel(row, root, pred, image_size, method=f"SD4Match-CPM ({method})"))
    qualitative_matches(panels, png, pdf, 0.1, method, image_size, prov.demo)
    _sidecar(png, prov, "qualitative")
