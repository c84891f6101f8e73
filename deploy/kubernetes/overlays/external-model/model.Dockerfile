# A model image for overlays/external-model: one checkpoint and a `cp` for the init container.
# Build with the directory holding the checkpoint as the context (the repository's .dockerignore
# leaves runs/ out of a context at the root):
#   docker build -f deploy/kubernetes/overlays/external-model/model.Dockerfile \
#       --build-arg CHECKPOINT=mi.safetensors -t charlm-model:mi runs/
FROM busybox:1.37
ARG CHECKPOINT=model.safetensors
COPY ${CHECKPOINT} /model/model.safetensors
USER 10001:10001
