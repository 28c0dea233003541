"""Turns one step's logits into tokens: penalties, temperature, truncation, reproducible draws, logprobs."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from shared.step_plan import SamplingOptions

_MASK64 = (1 << 64) - 1
# As in vLLM, a temperature below this is greedy: dividing by it would overflow the logits.
_MIN_TEMPERATURE = 1e-5
_CDF_BLOCK = 256


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """One row of logits to sample: whose options, which output position, which history."""

    options: SamplingOptions
    # t: the number of output tokens generated before this one.
    output_position: int
    prompt_token_ids: Sequence[int]
    # len == output_position for normal decoding.
    output_token_ids: Sequence[int]


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """One sampled token per row, with logprobs where the row asked for them."""

    token_ids: tuple[int, ...]
    # The chosen token's raw logprob, or None where `options.logprobs` is None.
    logprobs: tuple[float | None, ...]
    # The top-N (token id, logprob) pairs, most likely first; () where N is 0 or None.
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, output_position: int, attempt: int) -> float:
    """A uniform in [0, 1) that is a pure function of its arguments (a splitmix64 chain)."""
    mixed = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ output_position) ^ attempt)
    return (mixed >> 11) * 2.0**-53


def _just_below(values: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(values, torch.zeros_like(values))


def _has_penalties(options: SamplingOptions) -> bool:
    return (
        options.repetition_penalty != 1.0
        or options.presence_penalty != 0.0
        or options.frequency_penalty != 0.0
    )


class Sampler:
    """Samples one token per row of a logits batch; its only state is the generator of unseeded rows.

    Random rows are drawn by inverse CDF with one uniform per attempt. A seeded row takes its uniform
    from `seeded_uniform(seed, t, attempt)`, so its token depends only on its own logits, options and
    (seed, t): not on the batch, its row index, or a preemption that re-creates it. Unseeded rows share
    one `torch.rand` call on the sampler's generator.

    top_p needs no sort of the vocabulary (as in FlashInfer): a draw whose token lies outside the
    nucleus is rejected and repeated among the tokens more likely than it. The nucleus stays inside
    that support, so the accepted draw is distributed as the renormalised nucleus.
    """

    def __init__(
        self, vocab_size: int, device: torch.device, max_logprobs: int = 20, seed: int | None = None
    ) -> None:
        """`seed` seeds the generator of unseeded rows (None: a random seed per sampler)."""
        self.vocab_size = vocab_size
        self.device = device
        self.max_logprobs = max_logprobs
        self._generator = torch.Generator(device=device).manual_seed(
            secrets.randbits(63) if seed is None else seed
        )

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Samples `logits` ([len(rows), >= vocab_size], on `device`) without modifying it.

        Columns past `vocab_size` (a padded LM head) are ignored, so every id is < vocab_size.
        """
        self._check(logits, rows)
        logits = logits[:, : self.vocab_size]
        penalised = self.penalised_logits(logits, rows)
        random_rows = [i for i, row in enumerate(rows) if row.options.temperature >= _MIN_TEMPERATURE]
        if not random_rows:
            token_ids = _argmax_rows(penalised)
        elif len(random_rows) == len(rows):
            token_ids = self._sample_random(penalised, rows)
        else:
            random_index = self._index(random_rows)
            is_random = set(random_rows)
            greedy_index = self._index([i for i in range(len(rows)) if i not in is_random])
            token_ids = torch.empty(len(rows), dtype=torch.long, device=self.device)
            token_ids[greedy_index] = _argmax_rows(penalised[greedy_index])
            random_logits = penalised[random_index]
            token_ids[random_index] = self._sample_random(random_logits, [rows[i] for i in random_rows])
        return self._output(logits, token_ids, [row.options for row in rows])

    def penalised_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The logits after penalties and min_tokens bans, before temperature.

        Returns `logits` itself when no row changes it, else a modified copy. Repetition penalty (over
        prompt and output tokens) divides positive logits and multiplies negative ones; presence and
        frequency penalties (over output tokens) subtract `presence * (count > 0) + frequency * count`.
        """
        penalty_rows = [i for i, row in enumerate(rows) if _has_penalties(row.options)]
        banning_rows = [
            i
            for i, row in enumerate(rows)
            if row.output_position < row.options.min_tokens and row.options.banned_token_ids_before_min_tokens
        ]
        if not penalty_rows and not banning_rows:
            return logits
        logits = logits.clone()
        if penalty_rows:
            self._apply_penalties(logits, penalty_rows, rows)
        if banning_rows:
            banned = [rows[i].options.banned_token_ids_before_min_tokens for i in banning_rows]
            row_ids = list(chain.from_iterable([i] * len(ids) for i, ids in zip(banning_rows, banned)))
            logits[self._index(row_ids), self._index(list(chain.from_iterable(banned)))] = -float("inf")
        return logits

    def _check(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(rows) or logits.shape[1] < self.vocab_size:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not fit {len(rows)} rows over a vocabulary of "
                f"{self.vocab_size}: pass [num_rows, >= vocab_size]"
            )
        for row in rows:
            n = row.options.logprobs
            if n is not None and not 0 <= n <= self.max_logprobs:
                raise ValueError(f"logprobs={n} is outside [0, {self.max_logprobs}]: ask for fewer")

    def _apply_penalties(self, logits: torch.Tensor, indices: list[int], rows: Sequence[SamplingRow]) -> None:
        """Changes only the (row, token) pairs the histories hold, so its cost follows the histories."""
        chosen = [rows[i] for i in indices]
        output_rows, output_ids = self._history_pairs([row.output_token_ids for row in chosen])
        # Only repetition penalty looks at the prompt; skip its history where it is off.
        prompt_rows, prompt_ids = self._history_pairs(
            [row.prompt_token_ids if row.options.repetition_penalty != 1.0 else () for row in chosen]
        )
        counts = torch.zeros(len(chosen), self.vocab_size, dtype=torch.float32, device=self.device)
        counts.index_put_((output_rows, output_ids), torch.ones_like(output_ids, dtype=torch.float32), True)
        seen = torch.zeros(len(chosen), self.vocab_size, dtype=torch.bool, device=self.device)
        seen[output_rows, output_ids] = True
        seen[prompt_rows, prompt_ids] = True
        seen_rows, seen_ids = seen.nonzero(as_tuple=True)
        count = counts[seen_rows, seen_ids]
        repetition = self._vector([row.options.repetition_penalty for row in chosen])[seen_rows]
        presence = self._vector([row.options.presence_penalty for row in chosen])[seen_rows]
        frequency = self._vector([row.options.frequency_penalty for row in chosen])[seen_rows]
        logit_rows = self._index(indices)[seen_rows]
        values = logits[logit_rows, seen_ids]
        values = torch.where(values > 0, values / repetition, values * repetition)
        values -= frequency * count + presence * (count > 0)
        logits[logit_rows, seen_ids] = values

    def _history_pairs(self, histories: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index, token id) of every token of every history, as two flat int64 tensors."""
        token_ids = torch.tensor(list(chain.from_iterable(histories)), dtype=torch.long, device=self.device)
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long, device=self.device)
        return torch.repeat_interleave(torch.arange(len(histories), device=self.device), lengths), token_ids

    def _sample_random(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Temperature, then min_p, top_k and top_p as masks on the probabilities, then the draw."""
        options = [row.options for row in rows]
        # Unnormalised (the row maximum is 1): every later step only compares or rescales them.
        probs = logits / self._column([o.temperature for o in options])
        probs = probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
        if any(o.min_p > 0.0 for o in options):
            probs.masked_fill_(probs < self._column([o.min_p for o in options]), 0.0)
        top_k = [o.top_k if 0 < o.top_k < self.vocab_size else None for o in options]
        if any(k is not None for k in top_k):
            max_k = max(k for k in top_k if k is not None)
            # Rows without top_k read any column of the top values, then take a threshold of 0.
            kth_column = self._column([(k or 1) - 1 for k in top_k], torch.long)
            kth = probs.topk(max_k, dim=-1).values.gather(1, kth_column)
            kth = torch.where(self._column([k is not None for k in top_k], torch.bool), kth, 0.0)
            probs.masked_fill_(probs < kth, 0.0)
        return self._draw(probs, rows)

    def _draw(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Draws from each row of unnormalised `probs`, rejecting tokens outside the row's nucleus."""
        checks_nucleus = [row.options.top_p < 1.0 for row in rows]
        if not any(checks_nucleus):
            return self._inverse_cdf(probs, self._uniforms(rows, 0))
        nucleus_mass = self._column([row.options.top_p for row in rows]) * probs.sum(dim=-1, keepdim=True)
        # Tokens at or below a row's floor are known to lie outside its nucleus.
        floor = torch.zeros_like(nucleus_mass)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=self.device)
        pending = list(range(len(rows)))
        attempt = 0
        while pending:
            index = self._index(pending)
            support = probs if attempt == 0 else probs[index]
            if attempt:
                support.masked_fill_(support <= floor[index], 0.0)
            drawn = self._inverse_cdf(support, self._uniforms([rows[i] for i in pending], attempt))
            drawn_prob = support.gather(1, drawn[:, None])
            mass_above = support.masked_fill(support <= drawn_prob, 0.0).sum(dim=-1, keepdim=True)
            # The most likely token is always inside, so the loop ends; NaN (from non-finite logits)
            # compares False and is accepted rather than retried forever.
            is_outside = ((mass_above >= nucleus_mass[index]) & (mass_above > 0)).squeeze(1).tolist()
            accepted = [not is_outside[j] or not checks_nucleus[i] for j, i in enumerate(pending)]
            accepted_at = self._index([j for j, ok in enumerate(accepted) if ok])
            rejected_at = self._index([j for j, ok in enumerate(accepted) if not ok])
            token_ids[index[accepted_at]] = drawn[accepted_at]
            floor[index[rejected_at]] = drawn_prob[rejected_at]
            pending = [i for i, ok in zip(pending, accepted) if not ok]
            attempt += 1
        return token_ids

    def _uniforms(self, rows: Sequence[SamplingRow], attempt: int) -> torch.Tensor:
        """[len(rows)] float32 in [0, 1]: seeded rows from (seed, t, attempt), the rest from one draw."""
        seeded = [i for i, row in enumerate(rows) if row.options.seed is not None]
        if len(seeded) < len(rows):
            uniforms = torch.rand(len(rows), generator=self._generator, device=self.device)
        else:
            uniforms = torch.empty(len(rows), device=self.device)
        if seeded:
            values = [seeded_uniform(rows[i].options.seed, rows[i].output_position, attempt) for i in seeded]
            uniforms[self._index(seeded)] = torch.tensor(values, dtype=torch.float32, device=self.device)
        return uniforms

    def _inverse_cdf(self, weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """The first token whose cumulative weight exceeds `uniform * total`: never a zero-weight one.

        Two levels, block sums and then one block's prefix sums, since a whole-vocabulary cumsum is a
        serial loop on CPU.
        """
        num_rows, vocab_size = weights.shape
        num_blocks = -(-vocab_size // _CDF_BLOCK)
        if num_blocks * _CDF_BLOCK != vocab_size:
            weights = torch.nn.functional.pad(weights, (0, num_blocks * _CDF_BLOCK - vocab_size))
        blocks = weights.reshape(num_rows, num_blocks, _CDF_BLOCK)
        block_cdf = blocks.sum(dim=-1).cumsum(dim=-1)
        # A uniform rounded up to 1 would land past the last token: stay strictly below each total.
        target = torch.minimum(uniforms[:, None] * block_cdf[:, -1:], _just_below(block_cdf[:, -1:]))
        block_ids = torch.searchsorted(block_cdf, target, right=True).clamp_(max=num_blocks - 1)
        before = torch.where(block_ids > 0, block_cdf.gather(1, (block_ids - 1).clamp(min=0)), 0.0)
        within_cdf = blocks[torch.arange(num_rows, device=self.device), block_ids[:, 0]].cumsum(dim=-1)
        offset = torch.minimum(target - before, _just_below(within_cdf[:, -1:]))
        token_ids = block_ids * _CDF_BLOCK + torch.searchsorted(within_cdf, offset, right=True)
        return token_ids[:, 0].clamp_(max=vocab_size - 1)

    def _output(
        self, logits: torch.Tensor, token_ids: torch.Tensor, options: list[SamplingOptions]
    ) -> SamplerOutput:
        ids = token_ids.tolist()
        asked = [i for i, o in enumerate(options) if o.logprobs is not None]
        chosen: list[float | None] = [None] * len(ids)
        top: list[tuple[tuple[int, float], ...]] = [()] * len(ids)
        if asked:
            index = self._index(asked)
            asked_logits = logits if len(asked) == len(ids) else logits[index]
            logprobs = torch.log_softmax(asked_logits.float(), dim=-1)
            for i, value in zip(asked, logprobs.gather(1, token_ids[index, None]).squeeze(1).tolist()):
                chosen[i] = value
            max_n = max(options[i].logprobs or 0 for i in asked)
            if max_n:
                best = logprobs.topk(max_n, dim=-1)
                for i, best_ids, best_values in zip(asked, best.indices.tolist(), best.values.tolist()):
                    n = options[i].logprobs or 0
                    top[i] = tuple(zip(best_ids[:n], best_values[:n]))
        return SamplerOutput(token_ids=tuple(ids), logprobs=tuple(chosen), top_logprobs=tuple(top))

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _vector(self, values: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _column(self, values: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._vector(values, dtype)[:, None]


def _argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum. On the CPU numpy's argmax is several times faster than
    torch's reductions for a [batch, vocab] float32 tensor (measured: 0.3 ms vs 2-5 ms at 64 x 32000)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(np.argmax(logits.contiguous().numpy(), axis=-1)).to(torch.long)
    return logits.argmax(dim=-1)
