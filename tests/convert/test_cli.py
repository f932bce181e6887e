"""``r1mega-convert``'s exits: 0 with what to do next, 2 for what cannot be converted, 4 for a failed audit."""

from __future__ import annotations

import pytest
from convert.tiny_hf import hf_model, save_hf

from r1mega.cli.convert import main


def test_import_prints_how_to_train_and_export_round_trips(tmp_path, capsys) -> None:
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    main(["import", "--hf", str(src), "--out", str(tmp_path / "ckpt"), "--verify"])
    out = capsys.readouterr().out
    assert "verify: PASS" in out and f"checkpoint.load={tmp_path / 'ckpt'}" in out
    main(
        [
            "export",
            "--ckpt",
            str(tmp_path / "ckpt"),
            "--out",
            str(tmp_path / "out"),
            "--dtype",
            "bf16",
            "--verify",
            "--atol",
            "0.05",
        ]
    )
    assert "verify: PASS" in capsys.readouterr().out
    assert '"dtype": "bfloat16"' in (tmp_path / "out" / "config.json").read_text()
    assert '"temperature": 0.6' in (tmp_path / "out" / "generation_config.json").read_text()


def test_unrepresentable_model_exits_2(tmp_path, capsys) -> None:
    model = hf_model("llama")
    model.config.attention_bias = True
    src = save_hf(model, tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--hf", str(src), "--out", str(tmp_path / "ckpt")])
    assert exit_info.value.code == 2 and "attention_bias" in capsys.readouterr().err


def test_export_of_an_unknown_model_exits_2(tmp_path, capsys) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "model=<preset>" in capsys.readouterr().err


def test_failed_verify_exits_4(tmp_path, capsys) -> None:
    main(["import", "--hf", str(save_hf(hf_model("qwen2"), tmp_path / "hf")), "--out", str(tmp_path / "ckpt")])
    other = save_hf(hf_model("qwen2", seed=1), tmp_path / "other")
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--ckpt", str(tmp_path / "ckpt"), "--hf", str(other)])
    assert exit_info.value.code == 4 and "FAIL" in capsys.readouterr().err


def test_a_gguf_in_a_missing_package_exits_2_with_the_install_command(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--gguf", "pkg://no_such_package_r1mega/model.gguf", "--out", str(tmp_path / "ckpt")])
    assert exit_info.value.code == 2 and "no installed package 'no_such_package_r1mega'" in capsys.readouterr().err


def test_a_gguf_path_in_a_package_is_found_without_importing_it(tmp_path) -> None:
    from r1mega.cli.convert import resolve_gguf

    assert resolve_gguf("pkg://r1mega/conf/config.yaml").name == "config.yaml"
    assert resolve_gguf(str(tmp_path / "x.gguf")) == tmp_path / "x.gguf"
