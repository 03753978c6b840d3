"""The encoder RMT (BERT family) of "Scaling Transformer to 1M tokens and beyond"."""

from __future__ import annotations

import torch
from torch import nn

from rmt_deploy.spec import RMTConfig


class EncoderRMT(nn.Module):
    """A sequence classifier whose ``forward`` is one pure segment step.

    ``forward(input_ids, attention_mask, memory) -> (logits, new_memory)`` where
    ``input_ids`` is the full layout ``[CLS] mem.. [SEP] tokens [SEP] [PAD]..``. The memory
    replaces the word embeddings of the placeholder positions 1..M and goes through the
    rest of the embedding layer (positions, token type, LayerNorm), as the authors do.
    The new memory is the last layer's output at positions 1..M.
    """

    def __init__(self, model: nn.Module, config: RMTConfig) -> None:
        super().__init__()
        self.model = model
        self.rmt_config = config

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """The learned initial memory: word embeddings of the memory token ids."""
        ids = torch.tensor(self.rmt_config.mem_token_ids, dtype=torch.long)
        memory = self.model.get_input_embeddings().weight[ids]
        return memory.unsqueeze(0).expand(batch_size, -1, -1)

    def _embeds(self, input_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        m = self.rmt_config.num_mem_tokens
        embeds = self.model.get_input_embeddings()(input_ids)
        return torch.cat([embeds[:, :1], memory.to(embeds.dtype), embeds[:, 1 + m :]], dim=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.rmt_config.num_mem_tokens
        out = self.model(
            inputs_embeds=self._embeds(input_ids, memory),
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            output_hidden_states=True,
        )
        return out.logits, out.hidden_states[-1][:, 1 : 1 + m]

    def write(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor
    ) -> torch.Tensor:
        """The new memory alone: the step without the classifier."""
        m = self.rmt_config.num_mem_tokens
        out = self.model.base_model(
            inputs_embeds=self._embeds(input_ids, memory),
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        )
        return out.last_hidden_state[:, 1 : 1 + m]


#: Sequence classifiers whose step the export computes with work skipping: their layers
#: are BERT's (self-attention, output, intermediate, output), and how the head reads the
#: last layer ("pooler": BERT's pooler + classifier; "cls": RoBERTa's classification head
#: on the first row).
SKIPPING_HEADS = {
    "BertForSequenceClassification": "pooler",
    "RobertaForSequenceClassification": "cls",
    "XLMRobertaForSequenceClassification": "cls",
    "CamembertForSequenceClassification": "cls",
}


def skipping_step(rmt: EncoderRMT, write: bool) -> nn.Module | None:
    """The export-only module of the step (``write``: the write variant) that computes
    only what is read, or None for a base model it does not recognise."""
    head = SKIPPING_HEADS.get(type(rmt.model).__name__)
    base = rmt.model.base_model
    config = base.config
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if (head is None or not layers or config.is_decoder
            or config._attn_implementation not in ("eager", "sdpa")
            or not all(_bert_layer(layer) for layer in layers)):
        return None
    return SkippingStep(rmt, head, write)


def _bert_layer(layer: nn.Module) -> bool:
    attention = getattr(getattr(layer, "attention", None), "self", None)
    return (all(hasattr(attention, name) for name in ("query", "key", "value", "scaling"))
            and not getattr(layer, "add_cross_attention", False)
            and all(hasattr(layer, name) for name in ("intermediate", "output")))


class SkippingStep(nn.Module):
    """The encoder step for export, computing only the rows that are read.

    Every layer but the last runs on all positions. The last layer's keys and values come
    from every position, its queries only from the rows read: [CLS] and the memory rows
    1..M for the step, the memory rows for the write variant (no pooler, no classifier).
    Shapes are constants of the contract (encoder positions are fixed), so the graph has
    no shape arithmetic. The same weights and function as :meth:`EncoderRMT.forward`
    (``write``: :meth:`EncoderRMT.write`), which export validation checks it against.
    """

    def __init__(self, rmt: EncoderRMT, head: str, write: bool) -> None:
        super().__init__()
        self.rmt = rmt  # first: the base model's modules keep their names in the graph
        self.encoder = _SkippingEncoder(rmt.model.base_model.encoder.layer,
                                        rmt.rmt_config.input_size)
        self.head, self.write = head, write

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                memory: torch.Tensor):
        rmt, m = self.rmt, self.rmt.rmt_config.num_mem_tokens
        base = rmt.model.base_model
        zeros = torch.zeros(1, rmt.rmt_config.input_size, dtype=torch.long)
        hidden = base.embeddings(inputs_embeds=rmt._embeds(input_ids, memory),
                                 token_type_ids=zeros)
        if self.write:
            return self.encoder(hidden, attention_mask, 1, 1 + m)
        rows = self.encoder(hidden, attention_mask, 0, 1 + m)
        model = rmt.model
        if self.head == "pooler":
            logits = model.classifier(model.dropout(base.pooler(rows)))
        else:
            logits = model.classifier(rows)
        return logits, rows[:, 1:]


class _SkippingEncoder(nn.Module):
    """The base model's layers; the last one computes rows ``start:stop`` only."""

    def __init__(self, layers: nn.ModuleList, positions: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_SkippingLayer(layer, positions) for layer in layers)
        self.positions = positions

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int,
                stop: int) -> torch.Tensor:
        # eager attention's mask, as the base model makes it: 0 where attended, the dtype's
        # minimum elsewhere (a select, not a product: in FP16 the minimum becomes -inf)
        bias = torch.where(attention_mask[:, None, None, :] > 0,
                           torch.tensor(0.0, dtype=hidden.dtype),
                           torch.tensor(torch.finfo(hidden.dtype).min, dtype=hidden.dtype))
        *inner, last = self.layer
        for layer in inner:
            hidden = layer(hidden, bias, 0, self.positions)
        return last(hidden, bias, start, stop)


class _SkippingLayer(nn.Module):
    """A BERT-family layer computing rows ``start:stop`` of its output: queries from
    those rows, keys and values from every row; eager attention, as the base's."""

    def __init__(self, layer: nn.Module, positions: int) -> None:
        super().__init__()
        self._layer = (layer,)  # not a submodule: its modules keep the base model's names
        self.positions = positions

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, start: int,
                stop: int) -> torch.Tensor:
        layer = self._layer[0]
        attention = layer.attention.self
        heads, size = attention.num_attention_heads, attention.attention_head_size
        queries = hidden if (start, stop) == (0, self.positions) else hidden[:, start:stop]

        def split(x: torch.Tensor, length: int) -> torch.Tensor:
            return x.reshape(-1, length, heads, size).transpose(1, 2)

        query = split(attention.query(queries), stop - start)
        key = split(attention.key(hidden), self.positions)
        value = split(attention.value(hidden), self.positions)
        scores = torch.matmul(query, key.transpose(2, 3)) * attention.scaling + bias
        context = torch.matmul(torch.softmax(scores, dim=-1), value)
        context = context.transpose(1, 2).reshape(-1, stop - start, heads * size)
        attended = layer.attention.output(context, queries)
        return layer.output(layer.intermediate(attended), attended)
