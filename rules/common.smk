"""Config validation, paths, wildcard constraints and input functions shared by every stage."""

from pathlib import Path

from sd4match.config import TIMESTEP_SUFFIX, is_demo, method_config, validate_config
from sd4match.config_checks import train_settings_data
from sd4match.custom_dataset import (
    DEFAULT_PAIRS_FILE,
    custom_dataset_names,
    custom_zero_shot,
    is_custom,
)
from sd4match.provenance import canonical, subset_hash
from sd4match.reporting import zero_shot_protocols
from sd4match.seeds import (
    check_seeds,
    coerce_seed_lists,
    primary_seed,
    run_seeds,
    seed_dir,
)

CONFIG_SOURCE = "the workflow configuration (config.yaml + overlays)"
# Keys sorted: params compare as text, so reordering a YAML file must not rerun anything.
config = canonical(validate_config(coerce_seed_lists(config), source=CONFIG_SOURCE))
check_seeds(config, source=CONFIG_SOURCE)

RES = config["resources_dir"]
OUT = config["results_dir"]
DEMO = is_demo(config)
# logs/<run>/ and benchmarks/<run>/: the demo and the paper run never share a log or benchmark file
RUN = config["run_label"]
# The three benchmarks and any custom keypoint datasets (`datasets.<name>: {kind: custom, ...}`)
DATASETS = list(config["datasets"])
CUSTOM_DATASETS = custom_dataset_names(config)
TEST_DATASETS = config["evaluation"]["test_datasets"]
CONDA_ENV = "../envs/sd4match.yaml"
# Hub commits resolved by the first run; later runs and colleagues resolve these (see rules/models.smk).
MODEL_LOCK = "models.lock.yaml"


SD4 = config["sd4match"]
TRAIN_SETS = ["spair", "pfpascal"]
ZS = config["zero_shot"]
FIG3A = config["fig3a"]
FIG3B = config["fig3b"]
FIGS = config["figures"]
CAPTIONER = config["implicit_captioner"]
# What an evaluation computes: every matching method. `reported` only picks the tables' column, so editing it
# reruns the tables, never the evaluations.
EVAL_MATCHING = {k: v for k, v in config["matching"].items() if k != "reported"}


wildcard_constraints:
    dataset="|".join(DATASETS),
    trainset="|".join(TRAIN_SETS),
    split="trn|val|test",
    part="trnval|test",
    model="|".join(config["models"]),
    variant="[a-z0-9_]+",
    method="[a-z0-9_]+",
    t="[0-9]+",
    seed="0|[1-9][0-9]*",
    custom="|".join(CUSTOM_DATASETS) or "(?!)",  # never matches without custom datasets


def is_remote(url):
    """True for http(s) URLs; anything else is a local file the workflow may itself produce."""
    return url.startswith(("http://", "https://"))


def local_source(url):
    """The local file behind a file:// URL or a plain path (empty for remote URLs)."""
    if is_remote(url):
        return []
    return [url[len("file://") :] if url.startswith("file://") else url]


def dataset_sources(wildcards):
    """Local archives a dataset's fetch depends on (the demo world's archives are workflow outputs)."""
    cfg = config["datasets"][wildcards.dataset]
    if is_custom(cfg):  # an edit to its pairs file reruns what reads it
        return [custom_pairs_file(wildcards.dataset)]
    if cfg["local_path"]:
        return []
    urls = [cfg["url"]] + ([cfg["pairs_url"]] if "pairs_url" in cfg else [])
    return [path for url in urls for path in local_source(url)]


def custom_pairs_file(dataset):
    """The pairs file of a custom dataset (``pairs`` inside its ``local_path``)."""
    cfg = config["datasets"][dataset]
    return str(
        Path(cfg["local_path"]).expanduser() / (cfg.get("pairs") or DEFAULT_PAIRS_FILE)
    )


def fetch_settings(dataset):
    """What a dataset's fetch depends on: its config entry (a custom dataset's method list excluded)."""
    cfg = config["datasets"][dataset]
    return {k: v for k, v in cfg.items() if k != "zero_shot"}


def custom_spec(dataset):
    """How a custom dataset is parsed (name, threshold kind, pairs file); None for the benchmarks."""
    cfg = config["datasets"][dataset]
    if not is_custom(cfg):
        return None
    return {
        "name": dataset,
        "threshold": cfg["threshold"],
        "pairs_file": cfg.get("pairs") or DEFAULT_PAIRS_FILE,
    }


def tiny_model_dir(name):
    """Where the demo world's tiny model `name` is built."""
    return f"{RES}/tiny_models/{name}"


def model_source(wildcards):
    """A model folder the workflow builds itself (the demo world's tiny models), else nothing."""
    model_id = config["models"][wildcards.model]["id"]
    return [model_id] if model_id == tiny_model_dir(wildcards.model) else []


def log_path(name):
    """A log file of this run: ``logs/<run_label>/<name>``."""
    return f"logs/{RUN}/{name}"


def bench_path(name):
    """A benchmark file of this run: ``benchmarks/<run_label>/<name>``."""
    return f"benchmarks/{RUN}/{name}"


def fetch_record(dataset):
    return f"{RES}/data/{dataset}/fetch.json"


def model_record(name):
    return f"{RES}/models/{name}.json"


def pairs_table(dataset, split):
    return f"{OUT}/pairs/{dataset}_{split}.parquet"


def variant_kind(variant):
    """single | class | cpm for a configured prompt variant."""
    if variant not in SD4["variants"]:
        raise ValueError(
            f"prompt variant {variant!r} is not defined under 'sd4match.variants' in the config"
        )
    return SD4["variants"][variant]["kind"]


def train_settings(wildcards):
    """TrainSettings of one run: the config's training block plus variant kind, image size and the run's seed
    (the same function validates them at parse time)."""
    return train_settings_data(config, wildcards.variant, wildcards.seed)


def cpm_options(wildcards):
    """The CPM ablation options of a variant (None for Single/Class)."""
    cfg = SD4["variants"][wildcards.variant]
    return (
        None if cfg["kind"] != "cpm" else {k: v for k, v in cfg.items() if k != "kind"}
    )


def seeds_of(trainset, variant):
    """Replicate seeds of one run (`seeds`, or its `seeds_per_run` entry); the first is its primary seed."""
    return run_seeds(config, trainset, variant)


def primary(trainset, variant):
    """The primary seed of a run: the prompt the single-prompt figures show."""
    return primary_seed(config, trainset, variant)


def train_runs():
    """(training set, variant) of every configured prompt-tuning run."""
    return [
        (trainset, variant)
        for trainset, variants in SD4["train_sets"].items()
        for variant in variants
    ]


def eval_datasets(trainset, variant):
    """Test sets a learned prompt is evaluated on (Class only where its categories exist: its own set)."""
    if variant_kind(variant) == "class":
        return [d for d in TEST_DATASETS if d == trainset]
    return TEST_DATASETS


def latent_cache(dataset):
    return f"{OUT}/cache/latents/{dataset}_trnval.safetensors"


def test_latent_cache(dataset, model):
    """VAE posteriors of a test split's images under SD model `model`, read by every evaluation of the split."""
    return f"{OUT}/cache/latents/{dataset}_test_{model}.safetensors"


# What the test latents depend on besides the model and the image size: how the evaluations load the VAE.
VAE_ENCODER = {
    "precision": config["features"]["precision"],
    "channels_last": config["features"].get("channels_last", False),
}


def dino_cache(dataset, part):
    return f"{OUT}/cache/dinov2/{dataset}_{part}.safetensors"


def run_dir(stage, trainset, variant, seed):
    """`<OUT>/<stage>/<trainset>/<variant>/seed<k>`: the files of one seed of one run (stage: prompts,
    sd4match, timesteps); `seed` may be the wildcard string "{seed}"."""
    return f"{OUT}/{stage}/{trainset}/{variant}/{seed_dir(seed)}"


def prompt_dir(trainset, variant, seed):
    """One seed's prompt, loss curve and checkpoints."""
    return run_dir("prompts", trainset, variant, seed)


def prompt_file(trainset, variant, seed):
    return f"{prompt_dir(trainset, variant, seed)}/prompt.safetensors"


def loss_curve_file(trainset, variant, seed):
    return f"{prompt_dir(trainset, variant, seed)}/loss_curve.csv"


def sd4match_summary(trainset, variant, dataset, seed=None):
    """Summary of one evaluation of one seed (None: the run's primary seed)."""
    seed = primary(trainset, variant) if seed is None else seed
    return f"{run_dir('sd4match', trainset, variant, seed)}/{dataset}/summary.csv"


def sd4match_per_pair(trainset, variant, dataset, seed=None):
    """Per-pair scores of one evaluation of one seed (None: the primary seed), for the bootstrap intervals."""
    seed = primary(trainset, variant) if seed is None else seed
    return f"{run_dir('sd4match', trainset, variant, seed)}/{dataset}/per_pair.csv"


def sd4match_predictions(trainset, variant, dataset, seed=None):
    """Per-keypoint predictions of one evaluation of one seed (None: the primary seed), original frames."""
    seed = primary(trainset, variant) if seed is None else seed
    return (
        f"{run_dir('sd4match', trainset, variant, seed)}/{dataset}/predictions.parquet"
    )


def sd4match_seed_summaries(trainset, variant, dataset):
    """Summaries of every seed of one run on one test set: {seed: path}, primary seed first."""
    return {
        seed: sd4match_summary(trainset, variant, dataset, seed)
        for seed in seeds_of(trainset, variant)
    }


def train_inputs(wildcards):
    """Inputs of one training run; DINOv2 and its caches only for CPM."""
    inputs = {
        "pairs_trn": pairs_table(wildcards.trainset, "trn"),
        "pairs_val": pairs_table(wildcards.trainset, "val"),
        "data": fetch_record(wildcards.trainset),
        "sd_model": model_record(SD4["model"]),
        "latent_cache": latent_cache(wildcards.trainset),
    }
    if variant_kind(wildcards.variant) == "cpm":
        inputs["dinov2_model"] = model_record(SD4["dino_model"])
        inputs["dino_cache"] = dino_cache(wildcards.trainset, "trnval")
    return inputs


def evaluate_prompt_inputs(wildcards):
    """Inputs of one learned-prompt evaluation; DINOv2 tokens of the test images only for CPM."""
    inputs = {
        "prompt": prompt_file(wildcards.trainset, wildcards.variant, wildcards.seed),
        "pairs": pairs_table(wildcards.dataset, "test"),
        "data": fetch_record(wildcards.dataset),
        "sd_model": model_record(SD4["model"]),
        "latent_cache": test_latent_cache(wildcards.dataset, SD4["model"]),
    }
    if variant_kind(wildcards.variant) == "cpm":
        inputs["dino_cache"] = dino_cache(wildcards.dataset, "test")
        inputs["dinov2_model"] = model_record(SD4["dino_model"])
    return inputs


def sd4match_summaries(trainsets=TRAIN_SETS):
    """Summaries of every configured (training set, variant, test set) evaluation, every seed."""
    return [
        path
        for trainset, variant in train_runs()
        if trainset in trainsets
        for dataset in eval_datasets(trainset, variant)
        for path in sd4match_seed_summaries(trainset, variant, dataset).values()
    ]


def zero_shot_method(wildcards):
    """The configured zero-shot method (``<name>_t<T>``: at timestep T), with its model family."""
    method = method_config(ZS, wildcards.method)
    return method | {"family": config["models"][method["model"]]["kind"]}


def zero_shot_inputs(wildcards):
    """Pairs, data and the model records (and captioner weights) one zero-shot evaluation needs."""
    method = method_config(ZS, wildcards.method)
    inputs = {
        "pairs": pairs_table(wildcards.dataset, "test"),
        "data": fetch_record(wildcards.dataset),
        "model": model_record(method["model"]),
    }
    if method["kind"] == "sd" and method.get("protocol", "squashed") == "squashed":
        # DIFT in the S x S frame reads the test split's VAE posteriors (its own protocol encodes its own resize)
        inputs["latent_cache"] = test_latent_cache(wildcards.dataset, method["model"])
    if method.get("dino_model"):
        inputs["dino_model"] = model_record(method["dino_model"])
    if method.get("prompt") == "implicit":
        inputs["clip_model"] = model_record(CAPTIONER["clip_model"])
        inputs["captioner"] = f"{RES}/models/implicit_captioner.json"
    return inputs


def zero_shot_captioner(wildcards):
    """The implicit-captioner settings for methods prompted by it (None otherwise, so no rerun on edits)."""
    method = method_config(ZS, wildcards.method)
    return CAPTIONER if method.get("prompt") == "implicit" else None


def zero_shot_summary(method, dataset):
    return f"{OUT}/zero_shot/{method}/{dataset}/summary.csv"


def zero_shot_per_pair(method, dataset):
    return f"{OUT}/zero_shot/{method}/{dataset}/per_pair.csv"


def zero_shot_row_protocols(methods):
    """How each zero-shot method's table rows were obtained (sd4match.table_protocols), for table params;
    ``methods`` a list of names, or a dict whose values name the methods (keys kept)."""
    names = methods if isinstance(methods, dict) else {m: m for m in methods}
    protocols = zero_shot_protocols(
        {m: method_config(ZS, m) for m in set(names.values())}
    )
    return {key: protocols[m] for key, m in names.items()}


def zero_shot_summaries(methods):
    """Summaries of zero-shot methods on each of their configured test sets."""
    return {
        f"{m}/{d}": zero_shot_summary(m, d)
        for m in methods
        for d in ZS[m]["datasets"]
        if d in TEST_DATASETS
    }


def timestep_file(trainset, variant, dataset, t, seed, name="summary", ext="csv"):
    """Fig. 3b: `<name>.<ext>` (summary, per_pair or predictions) of one seed of a run evaluated at t."""
    return (
        f"{run_dir('timesteps', trainset, variant, seed)}/{dataset}_t{t}/{name}.{ext}"
    )


def timestep_summary(t, seed=None):
    """Fig. 3b: the summary of the swept run at timestep t, one seed (None: the primary seed).

    At the test timestep (`sd4match.evaluation.timestep`, 50) this is the main evaluation of the run on
    SPair-71k (`evaluate_prompt`: the same prompt, seed, ensemble and matching; the two rules' params differ
    only in that timestep), reused rather than run twice."""
    trainset, variant = FIG3B["trainset"], FIG3B["variant"]
    seed = primary(trainset, variant) if seed is None else seed
    if int(t) == SD4["evaluation"]["timestep"]:
        return sd4match_summary(trainset, variant, "spair", seed)
    return timestep_file(trainset, variant, "spair", t, seed)


def timestep_seed_summaries(t):
    """Fig. 3b: the summaries of every seed of the swept run at timestep t: {seed: path}."""
    return {
        seed: timestep_summary(t, seed)
        for seed in seeds_of(FIG3B["trainset"], FIG3B["variant"])
    }


def timestep_baseline_summary(t):
    """Fig. 3b: the baseline's SPair-71k summary at timestep t (`<baseline>_t<T>`). Where that method is the
    configured baseline itself (DIFT at its own t=261: same prompt, ensemble, seed, rule) it is the main
    evaluation Tables 1-3 read, reused rather than run twice."""
    base = FIG3B["baseline"]
    name = f"{base}_t{t}"
    if method_config(ZS, name) == method_config(ZS, base):
        name = base
    return zero_shot_summary(name, "spair")


def fig3a_summaries():
    """SPair-71k summaries of the six CPM conditioning cases, primary seeds (case number -> path)."""
    return {
        str(case): sd4match_summary(FIG3A["trainset"], variant, "spair")
        for case, variant in FIG3A["cases"].items()
    }


def fig3a_seed_summaries():
    """SPair-71k summaries of every seed of the six CPM cases (case number -> {seed: path})."""
    return {
        str(case): sd4match_seed_summaries(FIG3A["trainset"], variant, "spair")
        for case, variant in FIG3A["cases"].items()
    }


# Config sub-trees a table or figure depends on. Its provenance hash covers these and nothing else, so an edit
# elsewhere (a figure setting, another table's baseline) never reruns it; upstream edits rerun it through
# its inputs. Every table and figure also depends on EVAL_KEYS.
EVAL_KEYS = (
    "seed",
    "image_size",
    "features",
    *(f"matching.{key}" for key in EVAL_MATCHING),
    "evaluation",
)
SD4_KEYS = (
    "sd4match.model",
    "sd4match.dino_model",
    "sd4match.training",
    "sd4match.evaluation",
)
# Tables 2/3: each peer by its own protocol beside the paper's number (DINO and DINOv2: unstated, so ours),
# then DIFT and SD+DINO in this pipeline's 768 frame for comparison with SD4Match (reporting.ZERO_SHOT_LABELS)
TABLE2_ZERO_SHOT = ("dino", "dinov2", "dift_orig", "sddino", "dift", "sddino_squashed")
# The zero-shot DIFT table: DIFT's own protocol (beside the paper's numbers), then this pipeline's 768 frame
ZERO_SHOT_DIFT = ("dift_orig", "dift")
TABLE1_ZERO_SHOT = (
    "dift_empty",
    "dift",
    "sddino_star_empty",
    "sddino_star_template",
    "sddino_star",
)
# Table 1's cells: (row, prompt) -> zero-shot method
TABLE1_CELLS = {
    ("DIFT", "empty"): "dift_empty",
    ("DIFT", "template"): "dift",
    ("SD+DINO*", "empty"): "sddino_star_empty",
    ("SD+DINO*", "template"): "sddino_star_template",
    ("SD+DINO*", "implicit"): "sddino_star",
}
ALL_MODELS = ("sd21", "sd15", "dino", "dinov2", CAPTIONER["clip_model"])


def provenance(*paths, models=(), datasets=(), variants=(), zero_shot=()):
    """What a table/figure job passes to sd4match.provenance.build_provenance (hash of its config sub-tree)."""
    keys = [
        *EVAL_KEYS,
        *paths,
        *(f"models.{m}" for m in models),
        *(f"datasets.{d}" for d in datasets),
        *(f"sd4match.variants.{v}" for v in variants),
        *(f"zero_shot.{m}" for m in zero_shot),
    ]
    if variants:
        keys += [*SD4_KEYS, *(k for k in ("seeds", "seeds_per_run") if k in config)]
    return {
        "config_hash": subset_hash(config, keys),
        "demo": DEMO,
        "image_size": config["image_size"],
    }


def variants_of(trainsets):
    """Configured prompt variants trained on any of ``trainsets``."""
    return sorted({v for t, v in train_runs() if t in trainsets})


# Where each table/figure appears in `snakemake --report`: (category, subcategory).
REPORT_GROUPS = {
    "table1": ("Tables", "Table 1: prompt types"),
    "table2": ("Tables", "Table 2: SPair-71k per category"),
    "paired": ("Tables", "Table 2: paired differences"),
    "table3": ("Tables", "Table 3: generalisation"),
    "zero_shot_dift": ("Tables", "Zero-shot DIFT"),
    "fig3a": ("Ablations", "Fig. 3a: CPM conditioning"),
    "fig3b": ("Ablations", "Fig. 3b: timestep"),
    "fig4": ("Figures", "Fig. 4: Class prompts"),
    "fig5": ("Figures", "Fig. 5: CPM prompts"),
    "qualitative": ("Figures", "Qualitative matches"),
}


def report_caption(name):
    """The RST caption a table/figure job writes (protocol, models and revisions) for the report."""
    return f"{OUT}/report/{name}.rst"


def _report(path, name, kind):
    category, subcategory = REPORT_GROUPS[name]
    return report(
        path,
        caption=f"../report/{name}.rst",
        category=category,
        subcategory=subcategory,
        labels={"result": subcategory, "file": kind},
    )


def report_table(name):
    """The HTML table (ours / paper / delta) of ``name``, registered for the report."""
    return _report(f"{OUT}/tables/{name}.html", name, "table (HTML)")


def report_figure(name, ext):
    """A figure file (png or pdf) of ``name``, registered for the report."""
    return _report(f"{OUT}/figures/{name}.{ext}", name, f"figure ({ext.upper()})")


TABLES = ["table1", "table2", "paired", "table3", "zero_shot_dift", "fig3a", "fig3b"]
FIGURES = ["fig3a", "fig3b", "fig4", "fig5", "qualitative"]


def all_targets():
    """Every table and figure of the paper, and the table of each custom dataset."""
    return (
        [f"{OUT}/tables/{name}.{ext}" for name in TABLES for ext in ("csv", "md")]
        + [f"{OUT}/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]
        + [
            custom_table_file(name, ext)
            for name in CUSTOM_DATASETS
            for ext in ("csv", "md")
        ]
    )


# Custom keypoint datasets (issue 11): every zero-shot baseline of the dataset's list and every tuned prompt
# (every seed; Class prompts know only their training set's categories) evaluated on it, in one table.


def custom_table_file(name, ext):
    """`<OUT>/tables/custom_<name>.<ext>`: every method on one custom dataset."""
    return f"{OUT}/tables/custom_{name}.{ext}"


def custom_prompt_runs():
    """(training set, variant) of the tuned prompts evaluated on custom datasets: every run but Class."""
    return [(t, v) for t, v in train_runs() if variant_kind(v) != "class"]


def custom_zero_shot_summaries(name):
    """{method: summary} of the zero-shot methods evaluated on custom dataset `name`."""
    return {
        m: zero_shot_summary(m, name)
        for m in custom_zero_shot(config["datasets"][name])
    }


def custom_sd4match_summaries(name):
    """{"<trainset>/<variant>/<seed>": summary} of every tuned prompt (every seed) on `name`."""
    return {
        f"{t}/{v}/{seed}": sd4match_summary(t, v, name, seed)
        for t, v in custom_prompt_runs()
        for seed in seeds_of(t, v)
    }


def custom_provenance(name):
    """Provenance of a custom dataset's table (its dataset entry, methods and prompt variants)."""
    return provenance(
        "zero_shot_matching",
        "matching.reported",
        "implicit_captioner",
        "sd4match.train_sets",
        models=ALL_MODELS,
        datasets=[name],
        variants=sorted({v for _, v in custom_prompt_runs()}),
        zero_shot=sorted(
            {
                m if m in ZS else TIMESTEP_SUFFIX.match(m)["base"]
                for m in custom_zero_shot(config["datasets"][name])
            }
        ),
    )


def report_custom_table():
    """The HTML table of a custom dataset (wildcard `custom`), registered for the report."""
    return report(
        f"{OUT}/tables/custom_{{custom}}.html",
        caption="../report/custom.rst",
        category="Custom datasets",
        subcategory="{custom}",
        labels={"result": "{custom}", "file": "table (HTML)"},
    )


# The authors' released prompts (rules/released.smk): imported by a checkpoint, because which prompts the
# archive holds is known only once it is extracted; evaluated by the same rule as our tuned prompts.
RELEASED = config["released_prompts"]
RELEASED_SETS = ["spair", "pfpascal"]
RELEASED_VARIANTS = ["single", "class", "cpm"]


wildcard_constraints:
    released_set="|".join(RELEASED_SETS),
    released_variant="|".join(RELEASED_VARIANTS),


def released_prompts_dir():
    return f"{OUT}/released/prompts"


def released_import_report():
    return f"{OUT}/released/import_report.json"


def released_prompt_file(trainset, variant):
    return f"{released_prompts_dir()}/{trainset}/{variant}/prompt.safetensors"


def released_summary(trainset, variant, dataset):
    return f"{OUT}/released/{trainset}/{variant}/{dataset}/summary.csv"


def released_import_inputs(wildcards):
    """The model records the import checks against, and the archive when it is a local (demo) file."""
    archive = [] if RELEASED["local_path"] else local_source(RELEASED["url"])
    return {
        "sd_model": model_record(SD4["model"]),
        "dinov2_model": model_record(SD4["dino_model"]),
        "archive": archive,
    }


def released_runs():
    """(training set, variant) of every imported released prompt (after the import checkpoint ran)."""
    import json

    path = checkpoints.import_released_prompts.get().output.report
    with open(path) as handle:
        imported = json.load(handle)["imported"]
    return [(entry["trainset"], entry["variant"]) for entry in imported]


def released_eval_datasets(trainset, variant):
    """Test sets of a released prompt (Class only on its own training set, where its categories exist)."""
    if variant == "class":
        return [d for d in TEST_DATASETS if d == trainset]
    return TEST_DATASETS


def released_summaries(wildcards=None):
    """Summaries of every imported released prompt on each of its test sets."""
    return [
        released_summary(trainset, variant, dataset)
        for trainset, variant in released_runs()
        for dataset in released_eval_datasets(trainset, variant)
    ]


def released_eval_inputs(wildcards):
    """Inputs of evaluate_prompt for an imported released prompt (same keys as evaluate_prompt_inputs)."""
    run = (wildcards.released_set, wildcards.released_variant)
    if run not in released_runs():
        raise ValueError(
            f"the authors' release has no {run[1]} prompt tuned on {run[0]} "
            f"(see {released_import_report()}); imported: {released_runs()}"
        )
    inputs = {
        "prompt": released_prompt_file(*run),
        "pairs": pairs_table(wildcards.dataset, "test"),
        "data": fetch_record(wildcards.dataset),
        "sd_model": model_record(SD4["model"]),
        "latent_cache": test_latent_cache(wildcards.dataset, SD4["model"]),
    }
    if wildcards.released_variant == "cpm":
        inputs["dino_cache"] = dino_cache(wildcards.dataset, "test")
        inputs["dinov2_model"] = model_record(SD4["dino_model"])
    return inputs


# What the tables' uncertainty is computed from (issue 12): the per-pair CSV beside each summary they print
# (bootstrap intervals, paired differences), every seed's summary (spread across seeds), the pairs tables'
# reports (pairs evaluated), and the authors' released prompts' evaluations (their rows in Tables 2 and 3).


def pairs_report(dataset, split="test"):
    """The report a pairs_table job writes beside its parquet: pairs kept and skipped, for table captions."""
    return f"{OUT}/pairs/{dataset}_{split}.report.json"


def per_pair_of(summary):
    """The per-pair CSV beside an evaluation's summary.csv (every evaluation rule writes both)."""
    return str(Path(summary).with_name("per_pair.csv"))


def per_pairs_of(summaries):
    return [per_pair_of(summary) for summary in summaries]


def released_on(trainsets, datasets, every_test_set=False):
    """An input function: the released-prompt summaries of prompts tuned on ``trainsets``, on ``datasets``
    (``every_test_set``: only prompts evaluated on all the test sets, Table 3's rows). It reads the import
    checkpoint, so a dry run plans the import first and these evaluations after it."""

    def summaries(wildcards=None):
        return [
            released_summary(trainset, variant, dataset)
            for trainset, variant in released_runs()
            if trainset in trainsets
            and (
                not every_test_set
                or released_eval_datasets(trainset, variant) == TEST_DATASETS
            )
            for dataset in released_eval_datasets(trainset, variant)
            if dataset in datasets
        ]

    return summaries


def per_pairs_on(summaries_function):
    """An input function: the per-pair CSVs of another input function's summaries."""
    return lambda wildcards: per_pairs_of(summaries_function(wildcards))


def timestep_per_pairs():
    """Fig. 3b: the per-pair CSVs of the primary seed's sweep and of the baseline at every timestep."""
    return per_pairs_of(
        [timestep_summary(t) for t in FIG3B["timesteps"]]
        + [timestep_baseline_summary(t) for t in FIG3B["timesteps"]]
    )
