"""CharLSTM: Embedding → multi-layer nn.LSTM → Linear, over whole sequences in one call."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ModelConfig", "CharLSTM", "State"]

State = tuple[torch.Tensor, torch.Tensor]
"""(h, c), each of shape (layers, batch, hidden): the LSTM's memory, carried between calls."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # characters in the vocabulary; set from the corpus, never guessed
    embed: int = 128  # embedding width; characters are few, so a small embedding suffices
    hidden: int = 512  # LSTM width: the main knob for quality and for generation cost
    layers: int = 2  # stacked LSTM layers; the second one buys most of the depth gain
    dropout: float = 0.25  # on the embedding, between layers, and before the output layer

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


class CharLSTM(nn.Module):
    """Parameter names are PyTorch's own (embedding.*, lstm.*, fc.*) so plain modules can load them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed)
        self.lstm = nn.LSTM(
            config.embed,
            config.hidden,
            num_layers=config.layers,
            batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(config.dropout)
        self.fc = nn.Linear(config.hidden, config.vocab_size)
        self._init_forget_gate()

    def _init_forget_gate(self) -> None:
        """Forget-gate bias 1 (bias_ih + bias_hh), so early training remembers instead of forgetting."""
        h = self.config.hidden
        with torch.no_grad():
            for layer in range(self.config.layers):
                getattr(self.lstm, f"bias_ih_l{layer}")[h : 2 * h].fill_(1.0)
                getattr(self.lstm, f"bias_hh_l{layer}")[h : 2 * h].fill_(0.0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        ids: torch.Tensor,
        state: State | None = None,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """ids (batch, time) → logits (batch, time, vocab), the final state, and the mean loss in nats."""
        out, state = self.lstm(self.drop(self.embedding(ids)), state)
        logits = self.fc(self.drop(out))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, state, loss
