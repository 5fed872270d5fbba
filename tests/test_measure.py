import torch
from torch import nn

from polycom.compare.measure import interleaved_step_time


class _Tiny(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(8, width)
        self.out = nn.Linear(width, 8)

    def forward(self, x, targets=None):
        loss = nn.functional.mse_loss(self.out(torch.relu(self.lin(x))), targets)
        return type("Out", (), {"loss": loss})()


def test_interleaved_step_time_pairs_rounds_against_the_first_model():
    torch.manual_seed(0)
    models = {"base": _Tiny(16), "same": _Tiny(16), "wide": _Tiny(2048)}
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    out = interleaved_step_time(models, (x, y), repeats=3)
    assert out["base"]["step_time_paired_ratio"] == 1.0 and out["base"]["step_time_paired_to"] == "base"
    assert out["wide"]["step_time_paired_ratio"] > out["same"]["step_time_paired_ratio"]
    for k in models:
        assert out[k]["step_time_interleaved_p20_s"] <= out[k]["step_time_interleaved_s"] <= out[k]["step_time_interleaved_p80_s"]
