"""collect_vision_model component: the stage-2 model of whichever training branch ran, as one artifact."""

from kfp import dsl
from kfp.dsl import Model, Output
from llm2clip.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def collect_vision_model(location: str, vision_model: Output[Model]):
    """`vision_model` pointing at `location`, where train_clip or train_clip_trainjob wrote the model (a dsl.OneOf
    of their returned locations). Not a OneOf of their artifacts: KFP backend 2.16.x resolves an artifact OneOf to
    the last branch, run or not (kubeflow/pipelines issue 13436, fixed in 2.17.0), a parameter OneOf to the branch
    that ran (2.16.0 backend/src/v2/driver/resolve.go GetProducerTask). So the model must be in the object store."""
    from llm2clip import storage
    from llm2clip.artifacts import point, read_manifest

    if not storage.is_remote(location):
        raise ValueError(
            f"location={location!r}: stage 2 on a cluster hands its model on through the object store; set "
            "LLM2CLIP_STORE=s3://BUCKET/PREFIX in the llm2clip-config ConfigMap"
        )
    manifest = read_manifest(location, "train_clip")
    point(vision_model.path, location)
    vision_model.metadata.update({"location": location, **manifest.get("metrics", {})})
    if "skipped" in manifest:
        vision_model.metadata["skipped"] = manifest["skipped"]
