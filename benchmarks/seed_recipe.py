"""The textbook notebook's recipe, reproduced as the baseline every benchmark measures against.

Embedding → LSTM → Linear called one character at a time from Python, trained on a shuffled
DataLoader of random 40-character windows, sampled with Categorical(logits * scale_factor).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions.categorical import Categorical
from torch.utils.data import DataLoader, Dataset


class NotebookRNN(nn.Module):
    """The notebook's model (num_layers added so it can hold any charlm checkpoint's weights)."""

    def __init__(self, vocab_size: int, embed_dim: int, rnn_hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.rnn_hidden_size, self.num_layers = rnn_hidden_size, num_layers
        self.rnn = nn.LSTM(embed_dim, rnn_hidden_size, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(rnn_hidden_size, vocab_size)

    def forward(self, x, hidden, cell):  # type: ignore[no-untyped-def]
        out = self.embedding(x).unsqueeze(1)
        out, (hidden, cell) = self.rnn(out, (hidden, cell))
        out = self.fc(out).reshape(out.size(0), -1)
        return out, hidden, cell

    def init_hidden(self, batch_size: int):  # type: ignore[no-untyped-def]
        hidden = torch.zeros(self.num_layers, batch_size, self.rnn_hidden_size)
        cell = torch.zeros(self.num_layers, batch_size, self.rnn_hidden_size)
        return hidden, cell

    @classmethod
    def from_charlm(cls, model: nn.Module) -> NotebookRNN:
        cfg = model.config  # type: ignore[attr-defined]
        rnn = cls(cfg.vocab_size, cfg.embed, cfg.hidden, cfg.layers)
        state = {k.replace("lstm.", "rnn."): v for k, v in model.state_dict().items()}
        rnn.load_state_dict(state)
        return rnn.eval()


def sample(model, char2int, char_array, starting_str, len_generated_text=500, scale_factor=1.0):  # type: ignore[no-untyped-def]
    """The notebook's sample(), as written (no torch.no_grad, one model call per character)."""
    encoded_input = torch.tensor([char2int[s] for s in starting_str])
    encoded_input = torch.reshape(encoded_input, (1, -1))
    generated_str = starting_str
    model.eval()
    hidden, cell = model.init_hidden(1)
    for c in range(len(starting_str) - 1):
        _, hidden, cell = model(encoded_input[:, c].view(1), hidden, cell)
    last_char = encoded_input[:, -1]
    for _ in range(len_generated_text):
        logits, hidden, cell = model(last_char.view(1), hidden, cell)
        logits = torch.squeeze(logits, 0)
        scaled_logits = logits * scale_factor
        m = Categorical(logits=scaled_logits)
        last_char = m.sample()
        generated_str += str(char_array[last_char])
    return generated_str


class TextDataset(Dataset):
    """Random access to every (seq_length + 1)-character window, as the notebook builds it."""

    def __init__(self, text_chunks: torch.Tensor):
        self.text_chunks = text_chunks

    def __len__(self) -> int:
        return len(self.text_chunks)

    def __getitem__(self, idx: int):  # type: ignore[no-untyped-def]
        text_chunk = self.text_chunks[idx]
        return text_chunk[:-1].long(), text_chunk[1:].long()


def notebook_loader(encoded: torch.Tensor, seq_length: int = 40, batch_size: int = 64) -> DataLoader:
    chunk_size = seq_length + 1
    chunks = encoded.unfold(0, chunk_size, 1)
    return DataLoader(TextDataset(chunks), batch_size=batch_size, shuffle=True, drop_last=True)


def notebook_train_step(model: NotebookRNN, optimizer, loss_fn, seq_batch, target_batch) -> float:  # type: ignore[no-untyped-def]
    """One step of the notebook's loop: a Python loop over the 40 characters of the batch."""
    seq_length = seq_batch.size(1)
    hidden, cell = model.init_hidden(seq_batch.size(0))
    optimizer.zero_grad()
    loss = 0
    for c in range(seq_length):
        pred, hidden, cell = model(seq_batch[:, c], hidden, cell)
        loss += loss_fn(pred, target_batch[:, c])
    loss.backward()
    optimizer.step()
    return loss.item() / seq_length
