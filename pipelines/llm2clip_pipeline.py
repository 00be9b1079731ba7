"""The LLM2CLIP pipeline: data -> LLM caption-contrastive tuning -> embedding cache -> CLIP training -> evaluation.

Data moves between tasks only as artifacts. Two LLM-text models are trained (tuned LLM and, as a baseline, the raw
LLM) plus a standard CLIP baseline on the same data and budget; `evaluate` compares them in one report.

The compiled pipeline (`llm2clip compile`) also says where each task runs on Kubernetes: images, GPUs, node
selector and tolerations, resources, timeouts, retries, credentials and the store (`on_pod`, `on_gpu`).
`llm2clip run --local` runs the same DAG without them: kfp.local would apply the environment (HOME on /tmp) and
the retries to processes on this machine, and it ignores the rest.
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Dataset, Input, Model
from kfp.dsl.pipeline_channel import PipelineChannel
from llm2clip.components import (
    cache_caption_embeddings,
    collect_vision_model,
    evaluate,
    format_gpu_limit,
    locate_store,
    prepare_data,
    train_clip,
    train_clip_baseline,
    train_clip_trainjob,
    tune_caption_encoder,
)
from llm2clip.components import image as images

PIPELINE_NAME = "llm2clip"
COMPILED = Path(__file__).parent / "llm2clip.yaml"
GPU_IMAGE = images.IMAGE_GPU  # images/Dockerfile
# The CPU tasks run the same image by default: the one image the repository builds (hash-locked), which runs on CPU
# nodes too. A smaller CPU-only image of your own can go in the cpu_image parameter.
CPU_IMAGE = GPU_IMAGE

# ---- names shared with manifests/ (listed in manifests/names.json; tests check both sides agree)
S3_SECRET = "llm2clip-s3"  # a literal: a Secret name from a pipeline parameter fails inside ParallelFor
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CONFIG_MAP = "llm2clip-config"
CONFIG_MAP_KEYS = (
    "MINIO_ENDPOINT",
    "MINIO_SECURE",
    "LLM2CLIP_STORE",
    "LLM2CLIP_METRICS_PORT",
    "LLM2CLIP_PUSHGATEWAY",
    "LLM2CLIP_DOWNLOAD_CACHE",  # where s3:// models are fetched (llm2clip.model_sources); empty: under /tmp
)
POD_LABEL = ("app.kubernetes.io/part-of", "llm2clip")  # what the metrics PodMonitor selects
# The models_pvc parameter's default: a small placeholder PVC manifests/base creates. The KFP driver refuses an
# empty PVC name (the task fails: kubeflow/pipelines 2.16.0 backend/src/v2/driver/k8s.go:1076-1080, 2.17.0
# k8s.go:1149-1153, after resolveInputParameterStr in resolve.go:501-524 refuses ""), so "no volume" is a real one.
MODELS_PVC = "llm2clip-models"
MODELS_PATH = "/models"  # = llm2clip.ops.trainjob.MODELS_PATH, where the TrainJob's nodes mount it (tested)

# ---- pod settings fixed at compile time
# The image's root filesystem is read-only: every cache and config directory goes to /tmp.
WRITABLE_ENV = {"HOME": "/tmp", "HF_HOME": "/tmp/huggingface", "MPLCONFIGDIR": "/tmp/matplotlib"}
GPU_RESOURCE = "nvidia.com/gpu"
SHM_SIZE = "16Gi"  # /dev/shm for DataLoader workers; memory-backed, so it counts toward gpu_task_memory
# How many cache tasks of one fan-out run at once (each holds `gpus` GPUs); KFP needs it at compile time.
CACHE_PARALLELISM = 4
# A retry resumes: stage 2 from the latest checkpoint in its output location, the cache at its first shard
# without output, stage 1 from the start (it is short). KFP reruns a task's pod with the same output URIs.
GPU_RETRY = dict(num_retries=2, backoff_duration="120s", backoff_factor=2.0, backoff_max_duration="3600s")
# (cpu request, cpu limit, memory request, memory limit, timeout in hours) of the CPU tasks; the timeout bounds one
# attempt, so a hung task ends instead of holding its node.
CPU_TASKS = {
    "locate_store": ("250m", "1", "512Mi", "1Gi", 0.25),
    "format_gpu_limit": ("250m", "1", "512Mi", "1Gi", 0.25),
    "collect_vision_model": ("250m", "1", "512Mi", "1Gi", 0.25),
    "prepare_data": ("2", "4", "8Gi", "16Gi", 24),
    "evaluate": ("4", "8", "16Gi", "32Gi", 12),
    # stage 2 on train_nodes > 1: the pod only creates and follows the TrainJob; its nodes ask for the GPUs
    "train_clip_trainjob": ("250m", "1", "512Mi", "1Gi", 72),
}
GPU_TIMEOUT_H = {"tune_caption_encoder": 24, "cache_caption_embeddings": 48, "train_clip": 72}


def passed_in(task: dsl.PipelineTask, *values) -> None:
    """kfp 2.17 does not pass a resource's pipeline parameter into a ParallelFor (the task inside would reference
    an input its loop lacks); registering the parameter with the task does."""
    task.register_pipeline_channels([v for v in values if isinstance(v, PipelineChannel)])


def on_pod(task: dsl.PipelineTask, image, cpu: tuple, memory: tuple, timeout_h: float) -> dsl.PipelineTask:
    """What every task's pod gets: image, resources, timeout, writable HOME, S3 credentials, store, label."""
    task.set_container_image(image)
    task.set_cpu_request(cpu[0]).set_cpu_limit(cpu[1]).set_memory_request(memory[0]).set_memory_limit(memory[1])
    passed_in(task, *cpu, *memory)
    for key, value in WRITABLE_ENV.items():
        task.set_env_variable(key, value)
    kubernetes.use_secret_as_env(task, S3_SECRET, {k: k for k in S3_SECRET_KEYS})
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {k: k for k in CONFIG_MAP_KEYS})
    kubernetes.add_pod_label(task, *POD_LABEL)
    kubernetes.set_image_pull_policy(task, "IfNotPresent")
    kubernetes.set_timeout(task, int(timeout_h * 3600))
    return task


def with_models(task: dsl.PipelineTask, models_pvc) -> dsl.PipelineTask:
    """Mount the PVC `models_pvc` at /models, where `llm` and `pretrained` may point. KFP's PvcMount has no
    readOnly field (kubeflow/pipelines 2.17.0 kubernetes_platform/proto/kubernetes_executor_config.proto:84-104):
    read-only is the claim's access mode (ReadOnlyMany) or the volume's, and our code only reads under /models."""
    kubernetes.mount_pvc(task, pvc_name=models_pvc, mount_path=MODELS_PATH)
    passed_in(task, models_pvc)
    return task


def on_gpu(task: dsl.PipelineTask, gpu_limit, node_selector, tolerations) -> dsl.PipelineTask:
    """What a GPU step's pod adds: `gpu_limit` GPUs, the GPU nodes' selector and tolerations, /dev/shm, retries.

    `gpu_limit` must be a string channel (format_gpu_limit's output): the KFP driver resolves the accelerator count
    with GetStringValue, which is "" for a number, and then sets no limit (kubeflow/pipelines 2.16.0
    backend/src/v2/driver/driver.go:380-411 and resolve.go:810-823; 2.17.0 driver.go:415-446, resolve.go:818-831)."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpu_limit)
    passed_in(task, gpu_limit)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=SHM_SIZE)
    return task.set_retry(**GPU_RETRY)


@dsl.pipeline(name="train-clip-on-nodes", description="Stage 2 in the task's own pod, or on nodes > 1 via a TrainJob.")
def train_clip_on_nodes(
    dataset: Input[Dataset],
    caption_embeddings: Input[list[Dataset]],
    model: str,
    pretrained: str,
    epochs: int,
    batch_size: int,
    lr: float,
    nproc: int,
    seed: int,
    center_text: bool,
    device: str,
    dtype: str,
    enabled: bool,
    nodes: int,
    cpu_image: str,
    gpu_image: str,
    gpus: int,
    gpu_limit: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    gpu_task_cpu: str,
    gpu_task_memory: str,
    allow_hub: bool,
    models_pvc: str,
) -> Model:
    """One LLM-taught stage-2 training on the cluster. nodes 1: train_clip in its own GPU pod (torchrun, nproc
    processes, `gpu_limit` GPUs); more: train_clip_trainjob, a pod without GPU that runs a Kubeflow Trainer TrainJob
    of `nodes` nodes, each with `gpus` GPUs and the GPU task's CPU, memory, selector and tolerations. A sub-pipeline
    because kfp 2.17 cannot compile a ParallelFor's dsl.Collected output consumed inside a dsl.If (KeyError
    'for-loop-N').

    The model reaches the caller through a parameter dsl.OneOf of the location the branch that ran returns, made an
    artifact again by collect_vision_model: an artifact OneOf resolves to the last branch on KFP backend 2.16.x
    (kubeflow/pipelines issue 13436; 2.16.0 backend/src/v2/driver/resolve.go:1037-1041 takes the last artifact
    selector), while a parameter OneOf takes the first selector whose task completed or was cached (resolve.go:
    1061-1091; a branch not taken is CANCELED, backend/src/v2/metadata/client.go:610)."""
    args = dict(
        dataset=dataset,
        caption_embeddings=caption_embeddings,
        model=model,
        pretrained=pretrained,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        nproc=nproc,
        seed=seed,
        center_text=center_text,
        device=device,
        dtype=dtype,
        enabled=enabled,
        allow_hub=allow_hub,
    )
    with dsl.If(nodes == 1, name="one-node"):
        one = train_clip(**args).set_display_name("train_clip")
        on_pod(one, gpu_image, (gpu_task_cpu,) * 2, (gpu_task_memory,) * 2, GPU_TIMEOUT_H["train_clip"])
        on_gpu(one, gpu_limit, gpu_node_selector, gpu_tolerations)
        with_models(one, models_pvc)
    with dsl.Else(name="trainjob"):
        many = train_clip_trainjob(
            nodes=nodes,
            gpus=gpus,
            node_cpu=gpu_task_cpu,
            node_memory=gpu_task_memory,
            node_selector=gpu_node_selector,
            tolerations=gpu_tolerations,
            image=gpu_image,
            models_pvc=models_pvc,
            **args,
        ).set_display_name("train_clip_trainjob")
        cpu_req, cpu_lim, mem_req, mem_lim, timeout_h = CPU_TASKS["train_clip_trainjob"]
        on_pod(many, cpu_image, (cpu_req, cpu_lim), (mem_req, mem_lim), timeout_h)
        many.set_retry(**GPU_RETRY)  # a retried launcher adopts its TrainJob (named after the output location)
    model = collect_vision_model(location=dsl.OneOf(one.outputs["Output"], many.outputs["Output"]))
    cpu_req, cpu_lim, mem_req, mem_lim, timeout_h = CPU_TASKS["collect_vision_model"]
    on_pod(model.set_display_name("collect_vision_model"), cpu_image, (cpu_req, cpu_lim), (mem_req, mem_lim), timeout_h)
    return model.outputs["vision_model"]


def build_pipeline(on_cluster: bool):
    """The pipeline; `on_cluster` adds the pod settings (the compiled YAML), without them kfp.local runs it."""

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="LLM2CLIP: tune an LLM as caption encoder, cache its embeddings, train a CLIP vision encoder "
        "against them, and compare with a raw-LLM and a standard CLIP baseline.",
    )
    def llm2clip_pipeline(
        source: str = "synthetic",
        source_options: dict = {},  # noqa: B006 (a KFP parameter default, never mutated)
        num_train: int = 600,
        num_eval: int = 100,
        image_size: int = 64,
        seed: int = 0,
        llm: str = "smollm2-135m-instruct",
        allow_hub: bool = False,
        models_pvc: str = MODELS_PVC,
        bidirectional: bool = False,
        tune_steps: int = 16,
        tune_batch_size: int = 8,
        tune_lr: float = 2e-3,
        tune_warmup_steps: int = 0,
        tune_pairs: str = "short_long",
        tune_query_instructions: bool = True,
        tune_max_grad_norm: float = 1.0,
        lora_r: int = 16,
        cache_groups: int = 2,
        vision_model: str = "llm2clip-vit-tiny",
        pretrained: str = "",
        train_epochs: int = 15,
        train_batch_size: int = 64,
        train_lr: float = 0.0,
        train_nproc: int = 1,
        train_nodes: int = 1,
        center_text: bool = False,
        ablations: bool = False,
        zero_shot: list = ["synthetic"],  # noqa: B006 (a KFP parameter default, never mutated)
        device: str = "auto",
        dtype: str = "auto",
        cpu_image: str = CPU_IMAGE,
        gpu_image: str = GPU_IMAGE,
        gpus: int = 1,
        gpu_node_selector: dict = {},  # noqa: B006 (a KFP parameter default, never mutated)
        gpu_tolerations: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
        gpu_task_cpu: str = "8",
        gpu_task_memory: str = "64Gi",
    ) -> dsl.Artifact:
        """The whole pipeline. What each parameter means: `llm2clip run --help`, written from llm2clip.params (the
        stage config fields' help, or params.HELP) and docs/parameters.md; cpu_image, gpu_image, models_pvc, gpus and
        the gpu_* settings apply on a cluster only (kfp.local ignores them).
        Returns the evaluation artifact (summary.json, report.html, report.md).
        """

        def cpu_task(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
            task.set_display_name(name)
            if on_cluster:
                cpu_req, cpu_lim, mem_req, mem_lim, timeout_h = CPU_TASKS[name]
                on_pod(task, cpu_image, (cpu_req, cpu_lim), (mem_req, mem_lim), timeout_h)
            return task

        # the GPU steps' accelerator count, as the string the backend needs (on_gpu); kfp.local has no pods
        gpu_limit = cpu_task(format_gpu_limit(gpus=gpus), "format_gpu_limit").output if on_cluster else None

        def gpu_task(task: dsl.PipelineTask, name: str, display_name: str) -> dsl.PipelineTask:
            task.set_display_name(display_name)
            if on_cluster:
                on_pod(task, gpu_image, (gpu_task_cpu,) * 2, (gpu_task_memory,) * 2, GPU_TIMEOUT_H[name])
                on_gpu(task, gpu_limit, gpu_node_selector, gpu_tolerations)
                with_models(task, models_pvc)
            return task

        # The store (LLM2CLIP_STORE) enters prepare_data's cache key, read by a task that is never cached; every
        # later task takes prepare_data's dataset, so a run against another store misses the cache throughout.
        store = cpu_task(locate_store(), "locate_store").set_caching_options(enable_caching=False)
        data = prepare_data(
            source=source,
            source_options=source_options,
            num_train=num_train,
            num_eval=num_eval,
            image_size=image_size,
            seed=seed,
            cache_groups=cache_groups,
            store=store.output,
        )
        cpu_task(data, "prepare_data")
        tuned = tune_caption_encoder(
            dataset=data.outputs["dataset"],
            llm=llm,
            bidirectional=bidirectional,
            steps=tune_steps,
            batch_size=tune_batch_size,
            lr=tune_lr,
            lora_r=lora_r,
            seed=seed,
            device=device,
            dtype=dtype,
            allow_hub=allow_hub,
            pairs=tune_pairs,
            query_instructions=tune_query_instructions,
            max_grad_norm=tune_max_grad_norm,
            warmup_steps=tune_warmup_steps,
        )
        gpu_task(tuned, "tune_caption_encoder", "tune_caption_encoder")
        train_args = dict(
            model=vision_model,
            pretrained=pretrained,
            epochs=train_epochs,
            batch_size=train_batch_size,
            lr=train_lr,
            nproc=train_nproc,
            seed=seed,
            device=device,
            dtype=dtype,
            allow_hub=allow_hub,
        )

        def stage2(display_name: str, caption_embeddings, center_text, enabled=True) -> PipelineChannel:
            """An LLM-taught stage-2 training: in its own pod, or (cluster, train_nodes > 1) through a TrainJob."""
            args = dict(dataset=data.outputs["dataset"], caption_embeddings=dsl.Collected(caption_embeddings))
            args.update(center_text=center_text, enabled=enabled, **train_args)
            if not on_cluster:  # kfp.local: one process tree on this machine (run --local refuses train_nodes > 1)
                return gpu_task(train_clip(**args), "train_clip", display_name).outputs["vision_model"]
            placement = dict(
                cpu_image=cpu_image,
                gpu_image=gpu_image,
                gpus=gpus,
                gpu_limit=gpu_limit,
                gpu_task_cpu=gpu_task_cpu,
                gpu_task_memory=gpu_task_memory,
                gpu_node_selector=gpu_node_selector,
                gpu_tolerations=gpu_tolerations,
                models_pvc=models_pvc,
            )
            return train_clip_on_nodes(nodes=train_nodes, **args, **placement).set_display_name(display_name).output

        # LLM2CLIP embeds with the tuned LLM as it was tuned; the raw-LLM baseline with the frozen LLM as it is
        # (causal, no adapter), as the paper's raw-LLM row. Both are then trained with exactly the same recipe.
        trained, embeddings, ablated = {}, {}, {}
        for name, use_adapter, attention in (("llm2clip", True, "as_tuned"), ("llm2clip_raw_llm", False, "causal")):
            with dsl.ParallelFor(data.outputs["Output"], parallelism=CACHE_PARALLELISM) as group:
                cache = cache_caption_embeddings(
                    dataset=data.outputs["dataset"],
                    text_lora=tuned.outputs["text_lora"],
                    group=group,
                    use_adapter=use_adapter,
                    attention=attention,
                    device=device,
                    dtype=dtype,
                    allow_hub=allow_hub,
                )
                gpu_task(cache, "cache_caption_embeddings", f"cache_caption_embeddings ({name})")
            embeddings[name] = cache.outputs["caption_embeddings"]
            trained[name] = stage2(f"train_clip ({name})", embeddings[name], center_text)
            # Without centring, as the paper trains: LLM2CLIP's whenever its main training centres (so every report
            # shows what centring is worth), the raw LLM's only with `ablations`; else a "skipped" manifest.
            enabled = center_text if name == "llm2clip" else ablations
            ablated[name] = stage2(f"train_clip ({name}, no centring)", embeddings[name], False, enabled)
        baseline = train_clip_baseline(dataset=data.outputs["dataset"], **train_args)
        gpu_task(baseline, "train_clip", "train_clip_baseline")
        result = evaluate(
            dataset=data.outputs["dataset"],
            text_lora=tuned.outputs["text_lora"],
            llm2clip_model=trained["llm2clip"],
            raw_llm_model=trained["llm2clip_raw_llm"],
            clip_model=baseline.outputs["vision_model"],
            llm2clip_no_centring_model=ablated["llm2clip"],
            raw_llm_no_centring_model=ablated["llm2clip_raw_llm"],
            tuned_embeddings=dsl.Collected(embeddings["llm2clip"]),
            raw_embeddings=dsl.Collected(embeddings["llm2clip_raw_llm"]),
            device=device,
            zero_shot=zero_shot,
            allow_hub=allow_hub,
        )
        cpu_task(result, "evaluate")
        if on_cluster:  # zero-shot runs each LLM-taught model's text side: the base LLM again
            with_models(result, models_pvc)
        return result.outputs["evaluation"]

    return llm2clip_pipeline


# What `llm2clip run --local` runs (kfp.local) and what defines the parameters; compile_pipeline compiles the
# same DAG with the pod settings.
llm2clip_pipeline = build_pipeline(on_cluster=False)


def compile_pipeline(path: str | Path = COMPILED) -> Path:
    compiler.Compiler().compile(build_pipeline(on_cluster=True), str(path))
    return Path(path)
