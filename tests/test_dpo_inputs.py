"""train_dpo.py's bad inputs fail at once, before anything trains: a malformed pair file names its file and line,
a bad setting is one error, and an SFT run made on another base model is refused."""
import json
import os
import re

import pytest
import torch

import train_dpo
from test_train_dpo import files, tiny_config  # noqa: F401 (files is a fixture)
from trainer import base_fingerprint

@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Q: x\\nA:", "chosen": " y"}', "missing required field 'rejected'"),
    ('{"prompt": "Q: x\\nA:", "chosen": " y", "rejected": " y"}', "'chosen' and 'rejected' are identical"),
    ('{"prompt": "Q: x\\nA:", "chosen": " y", "rejected": 3}', "field 'rejected' must be a string, got int"),
    ('{"prompt": "Q: x\\nA:", "chosen": " y", "rejected": " z"', "invalid JSON"),
])
def test_malformed_pair_file_fails_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(dict(prompt="Q: a\nA:", chosen=" b", rejected=" c"))
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    out_dir = tmp_path / "never"
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        train_dpo.main([f"--data={path}", f"--out_dir={out_dir}", f"--sft_dir={tmp_path / 'no_sft'}", "--device=cpu"])
    assert not out_dir.exists() and not (tmp_path / "no_sft").exists()   # failed before training anything


@pytest.mark.parametrize("arg, message", [("--reference=policy", "reference must be 'sft', 'base' or a number in [0, 1]"),
                                          ("--reference=1.5", "got '1.5'"), ("--reference=nan", "got 'nan'"),
                                          ("--alpha=-1", "alpha must be a finite number >= 0"),
                                          ("--beta=high", "--beta=high: expected float"),
                                          ("--sft_weight=-1", "--sft_weight=-1.0: must be >= 0"),
                                          ("--sft_replay=-1", "--sft_replay=-1.0: must be >= 0")])
def test_bad_settings_fail_before_training(tmp_path, arg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_dpo.main([arg, f"--out_dir={tmp_path / 'never'}", f"--sft_dir={tmp_path / 'no_sft'}"])
    assert not (tmp_path / "never").exists() and not (tmp_path / "no_sft").exists()


def test_an_sft_run_on_another_base_is_refused(files, tmp_path):
    """Adapters only fit the base they were trained on: a re-pretrained base must not pass silently."""
    ckpt = torch.load(os.path.join(files["sft_dir"], "ckpt.pt"), weights_only=False)
    base = torch.load(ckpt["config"]["base"], weights_only=True)
    base["model"]["transformer.ln_f.weight"] = base["model"]["transformer.ln_f.weight"] + 1e-3   # another base
    torch.save(base, tmp_path / "other_base.pt")
    ckpt["config"] = ckpt["config"] | dict(base=str(tmp_path / "other_base.pt"))
    os.makedirs(tmp_path / "sft")
    torch.save(ckpt, tmp_path / "sft" / "ckpt.pt")
    with pytest.raises(ValueError, match="trained on another base model"):
        train_dpo.load_sft(tiny_config(files, tmp_path / "dpo", sft_dir=str(tmp_path / "sft")))
    model, _, _ = train_dpo.load_sft(tiny_config(files, tmp_path / "dpo", sft_dir=files["sft_dir"]))   # its own base
    assert base_fingerprint(model) == ckpt["base_fingerprint"]
