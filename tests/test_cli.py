from transformers import GPT2Config, GPT2LMHeadModel

from fam_hf.cli import main


def test_layers_lists_candidates_and_the_auto_head(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    assert main(["layers", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fam_layer='auto' -> lm_head" in out
    assert "transformer.h.0.attn.c_attn" in out and "conv1d" in out and "24×8" in out
    assert "* lm_head" in out
