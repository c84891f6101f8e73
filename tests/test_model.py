import torch

from charlm.model import CharLSTM, ModelConfig


def test_forget_gate_bias_starts_at_one() -> None:
    model = CharLSTM(ModelConfig(vocab_size=10, embed=4, hidden=6, layers=2))
    for k in range(2):
        total = getattr(model.lstm, f"bias_ih_l{k}") + getattr(model.lstm, f"bias_hh_l{k}")
        assert torch.allclose(total[6:12], torch.ones(6))


def test_carried_state_equals_one_long_call() -> None:
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=10, embed=4, hidden=6, layers=2, dropout=0.0)).eval()
    ids = torch.randint(0, 10, (3, 20))
    whole, _, _ = model(ids)
    first, state, _ = model(ids[:, :7])
    second, _, _ = model(ids[:, 7:], state)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-6)


def test_loss_is_cross_entropy_in_nats() -> None:
    model = CharLSTM(ModelConfig(vocab_size=5, embed=3, hidden=4, layers=1, dropout=0.0))
    ids = torch.randint(0, 5, (2, 8))
    logits, _, loss = model(ids, targets=ids)
    assert loss is not None
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), ids.reshape(-1))
    assert torch.isclose(loss, expected)
