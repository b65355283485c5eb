"""Train a tiny Llama with leanloss's fused loss under torch's distributed engines.

    torchrun --nproc_per_node 2 examples/train_distributed.py --mode ddp      # or fsdp, tp-fsdp, all

--mode ddp      DistributedDataParallel: every rank holds the whole model; the batch is split.
--mode fsdp     FSDP2 (fully_shard per decoder layer and the root): every rank holds 1/N of each
                parameter, gathered layer by layer; the batch is split.
--mode tp-fsdp  tensor parallel inside FSDP2 on a 2-D mesh (dp x tp): attention/MLP column- and
                row-parallel, lm_head column-parallel (each tp rank holds a slice of the vocabulary
                rows; the loss runs vocab-parallel and no rank ever holds (tokens, vocab) logits),
                and FSDP shards each of those slices over the dp ranks.
--mode all      the three in turn (the same data and initial weights: the same first loss).

CPU uses gloo, CUDA nccl (one GPU per rank). Every mode sees the same global batch per step,
split over the data-parallel ranks, and passes the GLOBAL number of counted targets as
``num_items_in_batch``; the loss is multiplied by the data-parallel size before backward
because DDP and FSDP average gradients over ranks. The printed loss is the global mean loss.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

from leanloss.integrations.transformers import apply_leanloss

MODES = ("ddp", "fsdp", "tp-fsdp")


def build_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same initial weights on every rank and in every mode
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def tensor_parallel_plan(model) -> dict:
    plan = {"lm_head": ColwiseParallel(use_local_output=False)}  # logits stay vocab-sharded
    for i in range(len(model.model.layers)):
        for name in ("q_proj", "k_proj", "v_proj"):
            plan[f"model.layers.{i}.self_attn.{name}"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        for name in ("gate_proj", "up_proj"):
            plan[f"model.layers.{i}.mlp.{name}"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    return plan


def global_batch(step: int, args, device):
    """The step's global batch, the same on every rank (a real loader would give each rank its
    part); padding at the end of each sequence is ignored (-100)."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(args.vocab, (args.batch, args.seq), generator=gen)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=gen)
    labels = ids.masked_fill(torch.arange(args.seq) >= lengths[:, None], -100)
    return ids.to(device), labels.to(device)


def setup(mode: str, args, device):
    world = dist.get_world_size()
    tp = args.tp if mode == "tp-fsdp" else 1
    if world % tp:
        raise SystemExit(f"--tp {tp} must divide the number of ranks {world}")
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    model = build_model(args).to(device)
    if mode == "tp-fsdp":
        parallelize_module(model, mesh["tp"], tensor_parallel_plan(model))
    apply_leanloss(model)  # lm_head a vocab-sharded DTensor: the vocab-parallel fused loss
    if mode in ("fsdp", "tp-fsdp"):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])  # embeddings, final norm and lm_head with the root
        wrapped = model
    else:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, wrapped, mesh


def say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write per line: the ranks share the terminal
    sys.stdout.flush()


def holds(model) -> str:
    weight = model.lm_head.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    where = f", placements {tuple(weight.placements)}" if hasattr(weight, "placements") else ""
    return f"lm_head.weight {tuple(weight.shape)} as {tuple(local.shape)}{where}"


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB (CUDA allocated)"
    return f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB (process max RSS)"


def train(mode: str, args, device) -> None:
    model, wrapped, mesh = setup(mode, args, device)
    rank, dp_group = dist.get_rank(), mesh["dp"].get_group()
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    say(f"[{mode} rank {rank}] stores {holds(model)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(1, args.steps + 1):
        ids, labels = global_batch(step, args, device)
        mine = slice(dp_rank * args.batch // dp, (dp_rank + 1) * args.batch // dp)
        ids, labels = ids[mine], labels[mine]
        # The global token count: this rank's shifted targets, summed over the data-parallel ranks
        # (and over the micro-batches of a step when accumulating gradients).
        num_items = (labels[:, 1:] != -100).sum()
        dist.all_reduce(num_items, group=dp_group)
        loss = wrapped(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
        (loss * dp).backward()  # DDP/FSDP average gradients over dp ranks: undo it
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total, group=dp_group)  # the global mean loss
        say(f"[{mode} rank {rank}] step {step} loss {total.item():.4f} {peak_memory(device)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES + ("all",), default="ddp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size of tp-fsdp")
    parser.add_argument("--vocab", type=int, default=1001, help="odd: uneven vocabulary shards")
    parser.add_argument("--batch", type=int, default=4, help="global sequences per step")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        for mode in (MODES if args.mode == "all" else (args.mode,)):
            train(mode, args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
