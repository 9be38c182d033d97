"""Bounded work before any check (issue 11 §6): LyCORIS updates too large to build, compressed
pickle archives, headers listing absurd numbers of tensors, and user regexes with catastrophic
backtracking are refused quickly and within a memory bound."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zipfile

import torch
from safetensors.torch import save_file

from _tiny import run_cli

# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
_RSS = """
import sys
from loratools.cli.main import main
code = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(code, int(hwm) // 1024)
"""


def _peak_mib(*args):
    """(exit code, peak RSS in MiB, stderr) of `loratools ARGS` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", _RSS, *map(str, args)], capture_output=True, text=True, timeout=300,
                       env=env)
    code, peak = p.stdout.splitlines()[-1].split()
    return int(code), int(peak), p.stderr


def _small_kohya(path):
    t = torch.randn
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": t(4, 768),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": t(768, 4),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0)}, str(path))


def test_loha_and_zip_bombs_stay_within_memory(tmp_path):
    baseline = tmp_path / "small.safetensors"
    _small_kohya(baseline)
    code, base_peak, err = _peak_mib("inspect", baseline)
    assert code == 0, err
    # a 1.6 MB LoHa whose ΔW would be 100000 x 100000 (40 GB in fp32)
    n = 100_000
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    loha = tmp_path / "loha.safetensors"
    save_file({f"{name}.hada_w1_a": torch.ones(n, 1), f"{name}.hada_w1_b": torch.ones(1, n),
               f"{name}.hada_w2_a": torch.ones(n, 1), f"{name}.hada_w2_b": torch.ones(1, n),
               f"{name}.alpha": torch.tensor(1.0)}, str(loha))
    for cmd in (["inspect", loha], ["convert", loha, "--to", "kohya", "-o", tmp_path / "o.safetensors"]):
        t0 = time.monotonic()
        code, peak, err = _peak_mib(*cmd)
        assert code == 1 and "10,000,000,000 elements" in err and err.count("\n") == 1, err
        assert peak - base_peak < 200 and time.monotonic() - t0 < 60, (peak, base_peak)
    # a torch.save archive re-packed with DEFLATE: 128 MiB of zeros in ~130 KB
    plain, bomb = tmp_path / "plain.pt", tmp_path / "adapter_model.bin"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(32 << 20)}, str(plain))
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(bomb) < 1 << 20
    peft = tmp_path / "peft"
    peft.mkdir()
    os.rename(bomb, peft / "adapter_model.bin")
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    code, peak, err = _peak_mib("inspect", peft)
    assert code == 1 and "compressed records" in err and err.count("\n") == 1, err
    assert peak - base_peak < 64, (peak, base_peak)


def test_header_with_absurd_entry_count_fails_fast(tmp_path, capsys):
    path = tmp_path / "many.safetensors"
    entry = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    header = json.dumps({f"t{i}": entry for i in range(300_000)}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    t0 = time.monotonic()
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 1 and "lists 300,000 tensors for 0 bytes" in err, err
    assert time.monotonic() - t0 < 5


def test_redos_patterns_are_refused_in_bounded_time(tmp_path, capsys):
    """A pattern that backtracks exponentially on the adapter's own module names."""
    folder = tmp_path / "redos"
    folder.mkdir()
    long_name = "base_model.model." + "a" * 40 + "b"
    save_file({f"{long_name}.lora_A.weight": torch.randn(4, 8), f"{long_name}.lora_B.weight": torch.randn(8, 4)},
              str(folder / "adapter_model.safetensors"))
    for cfg in ({"rank_pattern": {"(a|aa)+$": 4}}, {"alpha_pattern": {"(a|aa)+$": 4}},
                {"target_modules": "(.*\\.)?(a|aa)+$"}):
        (folder / "adapter_config.json").write_text(json.dumps(dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8},
                                                                    **cfg)))
        for args in (["inspect", folder], ["convert", folder, "--to", "peft", "-o", tmp_path / "out"]):
            t0 = time.monotonic()
            code, _, err = run_cli(capsys, *args)
            if "target_modules" in cfg and args[0] == "inspect":  # inspect does not match target_modules
                assert code == 0, err
            else:
                assert code == 1 and "takes too long to match" in err and err.count("\n") == 1, (cfg, args, err)
            assert time.monotonic() - t0 < 10
    assert sorted(os.listdir(tmp_path)) == ["redos"]


def test_real_peft_patterns_keep_their_meaning():
    """PEFT's own rule `(.*\\.)?(key)$`, through the bounded matcher."""
    from loratools.formats.peft import pattern_value

    patterns = {"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2, "mlp.*": 16, "^model.layers.0.k_proj": 3}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 4) == 8
    assert pattern_value(patterns, "model.layers.1.self_attn.v_proj", 4) == 2
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 4) == 4
    assert pattern_value(patterns, "model.layers.3.mlp.down_proj", 4) == 16
    assert pattern_value(patterns, "xq_proj", 4) == 4  # a suffix only at a dot
    assert pattern_value(patterns, "model.layers.0.k_proj", 4) == 3
