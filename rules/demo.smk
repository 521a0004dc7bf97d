"""The offline demo world: synthetic datasets in the official layouts and tiny models of the real classes."""

from sd4match.demo_world import demo_custom_images

DEMO_ARCHIVES = f"{RES}/demo_archives"


rule demo_datasets:
    output:
        spair=f"{DEMO_ARCHIVES}/SPair-71k.tar.gz",
        pfpascal_images=f"{DEMO_ARCHIVES}/PF-dataset-PASCAL.zip",
        pfpascal_pairs=f"{DEMO_ARCHIVES}/pf-pascal_image_pairs.zip",
        pfwillow_images=f"{DEMO_ARCHIVES}/PF-dataset.zip",
        pfwillow_pairs=f"{DEMO_ARCHIVES}/test_pairs.csv",
    log:
        log_path("world/demo_datasets.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        demo_world=config.get("demo_world", {}),
    script:
        "../workflow_scripts/demo_datasets.py"


rule tiny_model:
    output:
        directory(tiny_model_dir("{model}")),
    log:
        log_path("world/tiny_model_{model}.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        seed=config.get("demo_world", {}).get("seed", 0),
    script:
        "../workflow_scripts/tiny_model.py"


rule tiny_captioner:
    input:
        clip=tiny_model_dir("clip_vision"),
        sd=tiny_model_dir("sd15"),
    output:
        f"{RES}/tiny_models/implicit_captioner.safetensors",
    log:
        log_path("world/tiny_captioner.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        seed=config.get("demo_world", {}).get("seed", 0),
        prefix=CAPTIONER["prefix"],
    script:
        "../workflow_scripts/tiny_captioner.py"


# A small keypoint dataset in the custom layout (sd4match.custom_dataset): world.yaml configures it as
# datasets.shapes (kind: custom, local_path: this folder), so the custom-dataset path runs in the demo.
DEMO_CUSTOM = f"{RES}/demo_custom/shapes"


rule demo_custom_dataset:
    output:
        pairs=f"{DEMO_CUSTOM}/pairs.csv",
        images=[f"{DEMO_CUSTOM}/{name}" for name in demo_custom_images(config)],
    log:
        log_path("world/demo_custom_dataset.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        demo_world=config.get("demo_world", {}),
    script:
        "../workflow_scripts/demo_custom_dataset.py"
