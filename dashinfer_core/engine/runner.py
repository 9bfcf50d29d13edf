"""ModelRunner: owns the model, the KV cache, the attention backend and the sampler; turns a
scheduled batch into one flattened varlen forward (inputs + ForwardContext) and samples the next
token of every sequence that completed its tokens.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..cache.kv_cache import KVCache, bytes_per_block
from ..capabilities import choose_cpu_paths, detect, isolate_compile_cache, native_bf16
from ..config import EngineConfig
from ..errors import EngineDeadError
from ..layers.attention import make_attention_backend
from ..layers.context import ForwardContext, forward_context
from ..layers.sampler import Sampler, SamplerOutput
from ..loader import gguf_source, load_model, resolve_model_dir
from ..cache.block_manager import BlockOps
from .scheduler import ScheduledBatch
from .sequence import Sequence

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 4 << 30
WARM_UP_PROMPT_TOKENS = 16  # past the short chunks that take the decode path (TorchAttention.SHORT_CHUNK)
KEPT_LOGITS_MIN_BYTES = 32 << 20  # glibc maps every allocation past this afresh (its largest mmap threshold)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """The device of tensor-parallel rank `rank` (rank r of a CUDA group takes GPU r)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from ..errors import InvalidParameterError
        raise InvalidParameterError("device", "CUDA was requested but torch sees no CUDA device")
    if device.type == "cuda" and rank > 0:
        device = torch.device("cuda", rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name: str, device: torch.device, quantization: str | None = None) -> torch.dtype:
    """'auto': bfloat16 on CUDA; on the CPU float32 (token-identical to HF), except for GGUF weights:
    bfloat16 there, where torch's int4 kernel runs them (2x the speed of the fp32 route on an AVX-512
    machine, 4.6x on an AVX2 one: 44.5 against 204 ms a token), as llama.cpp itself computes with
    8-bit activations. dtype='float32' keeps the exact route."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        from ..capabilities import int4_gemv_works
        return torch.bfloat16 if quantization == "gguf" and int4_gemv_works() else torch.float32
    return _DTYPES[name]


def keep_freed_memory_mapped() -> None:
    """Stop glibc from returning freed activation buffers to the OS after every op: each step
    allocates the same multi-MB tensors again, and re-faulting their pages cost ~10% of a CPU
    decode step. Serving engines run with tcmalloc/jemalloc for the same reason."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: up to 32 MiB from the heap
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def padded_count(n: int) -> int:
    """The token (or row) count a CPU step is padded to: 1, 2, 4, 8, then multiples of 8 to 128, of 16
    to 256, of 32 to 512, of 64 beyond (35 sizes up to 512). oneDNN keeps a primitive per GEMM shape
    and glibc's heap fragments with every new buffer size: with each count from 1 to 512 possible, a
    server's memory grew for hours (benchmarks/soak.py). Padding costs little: GEMMs of a few dozen
    rows are bound by reading the weights, and past 64 rows the padding is under 1/8."""
    if n <= 8:
        return 1 << max(n - 1, 0).bit_length()
    step = 8 if n <= 128 else 16 if n <= 256 else 32 if n <= 512 else 64
    return -(-n // step) * step


@dataclass
class StepPlan:
    """Everything a rank needs for one forward, as host arrays: rank 0 builds it from the scheduled
    batch and, under tensor parallel, sends it to the other ranks in one message."""
    ops: BlockOps  # cache copies first
    input_ids: np.ndarray  # [T] int64 (padding tokens included)
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64, -1 = padding
    query_start: list[int]  # [B + 1]
    seq_lens: list[int]  # [B]
    block_tables: np.ndarray  # [B, max_blocks] int32
    num_decodes: int
    logit_rows: list[int]  # tokens whose logits are wanted (empty: none)
    lora_slots: np.ndarray | None = None  # [T] int32 adapter slot per token, -1 = none (None: no LoRA rows)
    lora_loads: list = None  # (slot, uid, LoRAAdapter) to copy into the device slots before the forward
    mrope_positions: np.ndarray | None = None  # [3, T] for an M-RoPE model (Qwen2-VL)
    mm_index: np.ndarray | None = None  # [K] step tokens that are image tokens ...
    mm_rows: torch.Tensor | None = None  # [K, hidden] ... and their image embeddings


@dataclass
class SampleRow:
    """One token to draw: for `seq`, from the logits of the last token of batch entry `batch_index`, or with
    speculative decoding of its token `offset` (the last computed token is 0, draft j is j + 1)."""
    seq: Sequence
    batch_index: int
    offset: int | None = None
    draft: int | None = None  # the draft this row verifies (None: the row after the last draft)
    view: object = None  # what the sampler reads instead of seq (speculative.DraftView)


class ModelRunner:
    """rank: this process's tensor-parallel rank. Rank 0 is the engine's runner: it starts the other
    ranks (launcher.RankGroup), plans each step and samples; ranks > 0 (rank_worker.py) only run
    the plans they receive."""

    def __init__(self, config: EngineConfig, rank: int = 0, group=None):
        """group: the TPGroup of a rank > 0 (rank 0 forms it itself)."""
        self.config = config
        self.rank = rank
        self.device = resolve_device(config.device, rank)
        self.dtype = resolve_dtype(config.dtype, self.device, config.quantization)
        if self.device.type == "cpu":
            if config.num_threads and config.tensor_parallel_size == 1:
                torch.set_num_threads(config.num_threads)
            keep_freed_memory_mapped()
        # Fast paths by what this machine can do, chosen once (capabilities.py); the CPU ones only.
        self.fast_paths = choose_cpu_paths(self.dtype, config.quantization, config.group_size,
                                           config.enforce_eager) if self.device.type == "cpu" else {}
        if self.device.type == "cpu":
            isolate_compile_cache()
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not native_bf16():
            logger.warning("this CPU has no native bf16 (%s): bfloat16 runs through F.linear, slower than float32",
                           detect().cpu_capability)
        self.model_dir = resolve_model_dir(config.model)
        from ..models import load_model_config
        self.model_cfg = load_model_config(self.model_dir)
        from ..distributed.parallel_state import SINGLE
        self.ranks = None
        self.tp = group or SINGLE
        if rank == 0 and config.tensor_parallel_size > 1:  # before the model: it is built as this rank's shard
            from ..distributed.launcher import RankGroup, check_tp_settings, set_rank_threads
            check_tp_settings(config, self.model_cfg, self.device)
            if self.device.type == "cpu":
                set_rank_threads(config, 0)
            self.ranks = RankGroup(config, self.device)
            self.tp = self.ranks.group
        parallel = self.tp.size > 1
        max_len = config.max_model_len or self.model_cfg.max_position_embeddings
        if self.model_cfg.sliding_window:
            max_len = min(max_len, self.model_cfg.sliding_window)  # attention never reaches past it
        self.model = load_model(self.model_dir, self.model_cfg, self.dtype, self.device, max_len, self.tp,
                                gguf_file=gguf_source(config.model, config.quantization))
        self.lora_slots = None
        self.lora_manager = None  # rank 0: the engine's LoRAManager, whose slot loads each plan carries
        if config.enable_lora:  # before quantizing: the wrapped base layers get quantized in place
            from ..lora.layers import LoRASlots
            self.lora_slots = LoRASlots(self.model, config.max_loras, config.max_lora_rank)
        if config.quantization and config.quantization != "gguf":  # GGUF weights came quantized
            from ..quant.linear import quantize_model
            quantize_model(self.model, config.quantization, config.group_size, self.device)
        packed = self.fast_paths.get("packed_linear")
        if packed is not None and packed.on and self.lora_slots is None and self.model_cfg.moe is None:
            # after loading and quantizing: nothing writes the weights from here on
            self.model.pack_weights()
        self.vocab_size = self.model_cfg.vocab_size
        self._logits_buffer: torch.Tensor | None = None  # see _kept_logits
        self.block_size = config.block_size
        self.attention = make_attention_backend(config.attention_backend, self.device,
                                                fused=self._path_on("compiled_attention"))
        self.kv_cache = self._allocate_kv_cache()
        self.max_model_len = min(max_len, self.kv_cache.num_blocks * self.block_size)
        if self.max_model_len < max_len:
            logger.warning("KV cache holds %d tokens: max_model_len lowered from %d to %d",
                           self.kv_cache.num_blocks * self.block_size, max_len, self.max_model_len)
        from ..models.compiled import CompiledLayerParts, wants_compiled_layers
        # Not under tensor parallel (the layer parts hold all-reduces, which stay eager), nor for MoE
        # models (the expert dispatch reads the routing on the host), nor with LoRA (likewise).
        if wants_compiled_layers(self.device, self.dtype, self._path_on("compiled_layers")) and \
                self.attention.native_on_cpu and not parallel and self.model_cfg.moe is None and \
                self.lora_slots is None:
            self.model.compiled_parts = CompiledLayerParts(self.model)
        self.sampler = Sampler(self.vocab_size, self.model_cfg.eos_token_ids, self.device)
        self.disk_io = None  # the prefix cache's disk tier: this rank's files (cache/disk_tier.py)
        if config.disk_cache_dir is not None and config.enable_prefix_caching:
            from ..cache.disk_tier import DiskIO
            self.disk_io = DiskIO(config, self)
        # CPU: steps see a few token counts, not every count up to the budget (see padded_count).
        self.bucket_shapes = self.device.type == "cpu" and config.bucket_batch_shapes
        self.graphs = None
        self.last_hidden: torch.Tensor | None = None
        if self.device.type == "cuda" and not config.enforce_eager and self.attention.supports_cuda_graphs and \
                not parallel and self.lora_slots is None and self.model_cfg.mrope_section is None:
            # graphs would capture the NCCL all-reduces, or freeze one step's adapter mapping or M-RoPE
            # positions: eager under tensor parallel, with LoRA and for vision-language models
            from .cuda_graphs import DecodeGraphs, default_capture_sizes
            self.graphs = DecodeGraphs(self.model, self.kv_cache.layers, self.attention, self.device,
                                       -(-self.max_model_len // self.block_size),
                                       default_capture_sizes(config.max_num_seqs))
            self.graphs.capture()

    def _path_on(self, name: str) -> bool:
        choice = self.fast_paths.get(name)
        return choice is None or choice.on  # off the CPU, the device's own paths apply

    def _allocate_kv_cache(self) -> KVCache:
        cfg = self.model_cfg
        from ..quant.kv import KV_BITS
        kv_bits = KV_BITS[self.config.kv_cache_dtype]
        if kv_bits == 4 and cfg.head_dim % 2:
            from ..errors import InvalidParameterError
            raise InvalidParameterError("kv_cache_dtype", "uint4 needs an even head_dim")
        num_kv_heads = self.tp.kv_head_shard(cfg.num_kv_heads)[1]  # this rank's (all of them without tensor parallel)
        per_block = bytes_per_block(cfg.num_layers, self.block_size, num_kv_heads, cfg.head_dim, self.dtype, kv_bits)
        budget = self.config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * self.config.gpu_memory_utilization)
            else:
                budget = CPU_DEFAULT_KV_BYTES
        num_blocks = self.tp.min_int(budget // per_block)  # every rank holds the same number
        if num_blocks < 1:
            from ..errors import InvalidParameterError
            raise InvalidParameterError("kv_cache_memory", f"{budget} bytes hold no KV block; one block of "
                                        f"{self.block_size} tokens needs {per_block} bytes")
        num_cpu_blocks = self.tp.min_int(self.config.cpu_cache_memory // per_block) \
            if self.config.enable_prefix_caching else 0
        return KVCache(cfg.num_layers, num_blocks, self.block_size, num_kv_heads, cfg.head_dim,
                       self.dtype, self.device, num_cpu_blocks=num_cpu_blocks, kv_bits=kv_bits,
                       keys_transposed=self.attention.keys_transposed(self.device, self.dtype, kv_bits))

    def shutdown(self) -> None:
        if self.ranks is not None:
            self.ranks.shutdown()

    # ---- one step ------------------------------------------------------------------------------
    def execute(self, batch: ScheduledBatch, rows: list[SampleRow], pool: list[int] = ()
                ) -> tuple[SamplerOutput | None, list[torch.Tensor]]:
        """Forward the batch; draw a token for each row. Returns host lists (the step's one sync), and the
        final hidden states of the tokens of each batch entry in `pool` (embedding requests)."""
        query_end = list(itertools.accumulate(batch.num_new_tokens))  # plain ints: numpy scalars cost per use
        logit_rows = [query_end[r.batch_index] - 1 if r.offset is None else
                      query_end[r.batch_index] - batch.num_new_tokens[r.batch_index] + r.offset for r in rows]
        if self.bucket_shapes and logit_rows:  # the LM head's GEMM too sees only a few row counts
            logit_rows += logit_rows[-1:] * (padded_count(len(logit_rows)) - len(logit_rows))
        logits = self._run(self._plan(batch, logit_rows))
        pooled = [self.last_hidden[query_end[i] - batch.num_new_tokens[i]:query_end[i]] for i in pool]
        self.last_hidden = None
        if not rows:
            return None, pooled
        with torch.inference_mode():
            return self.sampler(logits[:len(rows)], self.sampler.prepare(
                [r.seq if r.view is None else r.view for r in rows])).to_host(), pooled

    def warm_up(self) -> None:
        """Steps of the shapes a server meets first (a prompt alone, one and two decodes alone, and decodes beside
        a prompt), run before any request so that the compiled graphs they need (torch.compile treats a batch of 1
        apart) are built now and the first requests do not wait for them: a fresh FastChat worker's first chat
        took 5.98 s against 2.31 s for the next (2-core AMD EPYC, inductor's cache warm). Every sequence's
        tokens are stored from slot 0 on: the first blocks belong to no sequence yet, and a block is written (or
        zeroed) before a sequence reads it."""
        prompt_len = min(WARM_UP_PROMPT_TOKENS, self.kv_cache.num_blocks * self.block_size, self.max_model_len)
        for new_tokens in ([prompt_len], [1], [1, 1], [1, prompt_len], [1, 1, prompt_len]):
            num_tokens = sum(new_tokens)
            num_pad = (padded_count(num_tokens) if self.bucket_shapes else num_tokens) - num_tokens
            positions = np.array([p for n in new_tokens for p in range(n)] + [0] * num_pad, dtype=np.int64)
            slots = np.concatenate([positions[:num_tokens], np.full(num_pad, -1, dtype=np.int64)])
            table = np.arange(-(-max(new_tokens) // self.block_size), dtype=np.int32)
            query_end = list(itertools.accumulate(new_tokens))
            mrope = np.broadcast_to(positions, (3, len(positions))).copy() \
                if self.model_cfg.mrope_section is not None else None
            self._run(StepPlan(ops=BlockOps(), input_ids=np.zeros(len(positions), dtype=np.int64),
                               positions=positions, slot_mapping=slots, query_start=[0, *query_end],
                               seq_lens=list(new_tokens), block_tables=np.tile(table, (len(new_tokens), 1)),
                               num_decodes=new_tokens.count(1), logit_rows=[end - 1 for end in query_end],
                               mrope_positions=mrope))
        self.last_hidden = None

    def score(self, batch: ScheduledBatch, targets: list[int]) -> list[float]:
        """Forward a one-sequence batch and return the log-probability of targets[i] after its token i
        (scoring text; generation only needs the last token's distribution)."""
        logits = self._run(self._plan(batch, list(range(len(targets)))))
        with torch.inference_mode():
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            return logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None]).squeeze(1).tolist()

    def _run(self, plan: StepPlan) -> torch.Tensor | None:
        """Rank 0: send the plan to the other ranks, then run it here too. A broken group (a rank
        died) raises EngineDeadError: the engine cannot go on."""
        if self.ranks is None:
            return self.run_plan(plan)
        self.ranks.send(plan)
        try:
            return self.run_plan(plan)
        except Exception as exc:  # a rank stopped half-way through a forward is out of step: fatal
            raise self.ranks.collective_failed(exc) from exc

    @property
    def broken(self) -> bool:
        """A tensor-parallel rank died: nothing can run any more."""
        return self.ranks is not None and self.ranks.failure is not None

    def check_alive(self) -> None:
        if self.broken:
            raise EngineDeadError(f"tensor-parallel group broken: {self.ranks.failure}")

    def on_failure(self, callback) -> None:
        """callback() runs (on a watchdog thread) when a rank dies, so an idle engine learns of it."""
        if self.ranks is not None:
            self.ranks.on_failure = callback

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan) -> torch.Tensor | None:
        """Every rank: the cache copies, the forward, and the logits of plan.logit_rows ([R, vocab];
        under tensor parallel the all-gather of every rank's vocabulary part)."""
        self.kv_cache.apply(plan.ops)
        input_ids, ctx = self._to_device(plan)
        meta = ctx.attn_meta
        if self.lora_slots is not None:
            self.lora_slots.prepare_step(plan.lora_loads or [], plan.lora_slots, self.device, self.dtype)
        if self.graphs is not None and self.graphs.can_run(meta.num_decodes, meta.num_seqs, input_ids.shape[0]):
            hidden = self.graphs.run(input_ids, ctx)
        else:
            try:
                hidden = self.model(input_ids, ctx)
            finally:
                if self.lora_slots is not None:
                    self.lora_slots.step.batch = None
        self.last_hidden = hidden  # read by execute for pooling rows, right after
        if not plan.logit_rows:
            return None
        rows = plan.logit_rows
        if not (len(rows) == hidden.shape[0] and rows[0] == 0 and rows[-1] == len(rows) - 1 and
                rows == list(range(len(rows)))):  # (decodes only: every row, in order, no gather)
            hidden = hidden[torch.tensor(rows, device=self.device)]
        kept = self._kept_logits(len(rows), hidden.dtype)
        return self.model.compute_logits(hidden) if kept is None else self.model.compute_logits(hidden, out=kept)

    def _kept_logits(self, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A kept [rows, vocab] tensor for a step's logits where a fresh one would pass glibc's largest
        mmap threshold (32 MiB): such a tensor is mapped afresh and unmapped every step (256 rows of a
        49,152-token vocabulary in fp32, 2 threads: ~10 ms of page faults in the LM head and ~5 ms to unmap it
        in a 35-38 ms step of the tiny model). None: a fresh tensor (small enough, or not on the CPU)."""
        # (a quantized LM head writes its own output: nothing to keep for it)
        if self.device.type != "cpu" or self.config.tensor_parallel_size > 1 or \
                getattr(self.model, "logits_quant", None) is not None or \
                rows * self.vocab_size * dtype.itemsize <= KEPT_LOGITS_MIN_BYTES or \
                rows > padded_count(self.config.max_num_seqs):  # (not a long scored text: kept for good)
            return None
        kept = self._logits_buffer
        if kept is None or kept.shape[0] < rows or kept.dtype != dtype:
            kept = self._logits_buffer = torch.empty(rows, self.vocab_size, dtype=dtype)
        return kept[:rows]

    def _plan(self, batch: ScheduledBatch, logit_rows: list[int]) -> StepPlan:
        bs = self.block_size
        ids, positions, slots, seq_lens = [], [], [], []
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        block_tables = np.zeros((len(batch.seqs), max_blocks), dtype=np.int32)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, table = seq.num_computed_tokens, seq.block_table
            block_tables[i, :len(table)] = table
            seq_lens.append(start + n)
            if n == 1 and start < len(seq.token_ids):  # a decode: plain ints (numpy's per-call cost is most
                ids.append(seq.token_ids[start])     # of a step's planning at batch 64)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                continue
            ids.extend(seq.token_ids[start:start + n])
            if start + n > len(seq.token_ids):  # speculative decoding: the drafts follow the tokens
                ids.extend(seq.spec_tokens[max(0, start - len(seq.token_ids)):start + n - len(seq.token_ids)])
            chunk = np.arange(start, start + n, dtype=np.int64)
            positions.extend(chunk.tolist())
            slots.extend((np.asarray(table, dtype=np.int64)[chunk // bs] * bs + chunk % bs).tolist())
        query_start = [0, *itertools.accumulate(batch.num_new_tokens)]  # (plain ints: see above)
        num_pad = padded_count(query_start[-1]) - query_start[-1] if self.bucket_shapes else 0
        if num_pad:  # padding tokens: id 0 at position 0, stored nowhere (slot -1), in no sequence
            ids.extend([0] * num_pad)
            positions.extend([0] * num_pad)
            slots.extend([-1] * num_pad)
        mrope = mm_index = mm_rows = None
        if self.model_cfg.mrope_section is not None:
            mrope, mm_index, mm_rows = self._plan_images(batch, query_start, num_pad)
        lora_slots = lora_loads = None
        if self.lora_manager is not None:
            lora_loads = self.lora_manager.take_loads()
            if any(seq.lora_slot >= 0 for seq in batch.seqs):
                lora_slots = np.full(query_start[-1] + num_pad, -1, dtype=np.int32)
                for i, seq in enumerate(batch.seqs):
                    lora_slots[query_start[i]:query_start[i + 1]] = seq.lora_slot
        return StepPlan(ops=batch.ops, input_ids=np.array(ids, dtype=np.int64),
                        positions=np.array(positions, dtype=np.int64), slot_mapping=np.array(slots, dtype=np.int64),
                        query_start=query_start, seq_lens=seq_lens, block_tables=block_tables,
                        num_decodes=batch.num_decodes, logit_rows=logit_rows, lora_slots=lora_slots,
                        lora_loads=lora_loads, mrope_positions=mrope, mm_index=mm_index, mm_rows=mm_rows)

    @staticmethod
    def _plan_images(batch: ScheduledBatch, query_start: list[int], num_pad: int):
        """M-RoPE positions of the step's tokens ([3, T]: a prompt's from its images' layout, generated
        tokens at index + delta) and the image embeddings of the image tokens it computes."""
        rows = [np.zeros((3, 0), dtype=np.int64)]
        index, embeds = [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            mm = seq.request.mm
            if mm is None:
                rows.append(np.broadcast_to(np.arange(start, end, dtype=np.int64), (3, n)))
                continue
            prompt_len = mm.positions.shape[1]
            part = [mm.positions[:, start:min(end, prompt_len)]]
            if end > prompt_len:
                part.append(np.broadcast_to(np.arange(max(start, prompt_len), end, dtype=np.int64) + mm.delta,
                                            (3, end - max(start, prompt_len))))
            rows.append(np.concatenate(part, axis=1))
            for image in mm.images:  # the part of each image's tokens this chunk covers
                a, b = max(start, image.offset), min(end, image.offset + image.num_tokens)
                if a < b:
                    index.append(np.arange(a, b) - start + query_start[i])
                    embeds.append(image.embeds[a - image.offset:b - image.offset])
        rows.append(np.zeros((3, num_pad), dtype=np.int64))
        if not index:
            return np.concatenate(rows, axis=1), None, None
        return np.concatenate(rows, axis=1), np.concatenate(index), torch.cat(embeds)

    def _to_device(self, plan: StepPlan) -> tuple[torch.Tensor, ForwardContext]:
        def to_dev(a, dtype):  # host lists and arrays; on the CPU without a second copy where the dtype matches
            # (a list through numpy: torch.tensor(list) took ~20 us a call in a CPU step, np.array a few)
            t = torch.from_numpy(a if isinstance(a, np.ndarray) else
                                 np.array(a, dtype=np.int32 if dtype == torch.int32 else np.int64))
            return t if t.dtype == dtype and t.device == self.device else t.to(device=self.device, dtype=dtype)
        ctx = forward_context(
            positions=to_dev(plan.positions, torch.int64), slot_mapping=to_dev(plan.slot_mapping, torch.int64),
            query_start_loc=to_dev(plan.query_start, torch.int32), seq_lens=to_dev(plan.seq_lens, torch.int32),
            block_tables=to_dev(plan.block_tables, torch.int32), num_decodes=plan.num_decodes,
            backend=self.attention, kv_layers=self.kv_cache.layers, rotary=self.model.rotary,
            query_start_loc_host=plan.query_start, seq_lens_host=plan.seq_lens,
            slot_mapping_host=plan.slot_mapping, block_tables_host=plan.block_tables, positions_host=plan.positions,
            mrope_positions=None if plan.mrope_positions is None else to_dev(plan.mrope_positions, torch.int64),
            mm_embeds=None if plan.mm_index is None else (to_dev(plan.mm_index, torch.int64),
                                                           plan.mm_rows.to(self.device)))
        return to_dev(plan.input_ids, torch.int64), ctx
