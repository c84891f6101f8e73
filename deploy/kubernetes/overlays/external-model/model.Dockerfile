# A model image for overlays/external-model: a directory of models, /models/*.safetensors (each is
# served under its file's stem), and busybox's `sh` and `cp`, with which the init container copies
# them into the pod. Build it from a directory holding only the models to serve: every
# *.safetensors there is taken, and a training state (*.state.safetensors) would be listed as a
# model that does not load. (The repository's .dockerignore applies only to a context at the root.)
#   mkdir -p my-models && cp runs/mi.safetensors runs/other.safetensors my-models/
#   docker build -f deploy/kubernetes/overlays/external-model/model.Dockerfile -t charlm-model:TAG my-models/
FROM busybox:1.37
COPY *.safetensors /models/
USER 10001:10001
