"""The tokenizer that travels with a checkpoint, and its Hugging Face form (the tokenizer half of `to-hf`).

Beside the checkpoints (`checkpoint.dir`) lives one of:
    tokenizer/        a Hugging Face tokenizer's files, copied unchanged (from `from-hf`, or from the data's
                      manifest when it was tokenized with an HF tokenizer); `to-hf` writes them out unchanged
    tokenizer.model   our SentencePiece model; `to-hf` exports it as an equivalent fast tokenizer
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

HF_TOKENIZER_DIR = "tokenizer"
SP_MODEL = "tokenizer.model"
# The files that make up a Hugging Face tokenizer (never the weights or the model config).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                      "chat_template.json")


def is_hf_tokenizer_dir(folder: str) -> bool:
    """Whether `folder` holds a Hugging Face tokenizer (not only a SentencePiece model)."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def copy_hf_tokenizer(src: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer files of folder `src` (or the single tokenizer.json `src`) unchanged into `dst_dir`."""
    os.makedirs(dst_dir, exist_ok=True)
    if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(dst_dir, "tokenizer.json"))
        return ["tokenizer.json"]
    names = [f for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
    for f in names:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst_dir, f))
    return names


def load_hf_tokenizer(folder: str):
    """A transformers tokenizer from a folder of tokenizer files (a bare tokenizer.json included)."""
    import warnings

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(folder)
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    if tok.eos_token is None:  # a bare tokenizer.json names no EOS: the usual end-of-text tokens, as preprocess does
        specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
        eos = next((n for n in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>") if n in specials), None)
        if eos is not None:
            tok.eos_token = eos
    return tok


def hf_tokenizer_ids(tok) -> dict:
    """bos/eos/pad ids of a transformers tokenizer, as config.json keys."""
    return {f"{k}_token_id": getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}


def tokenizer_info(model_path: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    return {"bos_id": sp.bos_id(), "eod_id": sp.eos_id(), "pad_id": sp.pad_id(), "unk_id": sp.unk_id()}


def hf_tokenizer(model_path: str):
    """Our SentencePiece model as a transformers fast tokenizer that encodes and decodes exactly as it does.

    transformers' own LlamaTokenizer differs from SentencePiece on text that starts with a space (its Metaspace
    pre-tokenizer skips the dummy prefix there) and on text containing "<s>" (it parses special tokens), so the
    pipeline is built here from the model's own normalizer settings instead."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram
    # LlamaTokenizerFast: in 4.x LlamaTokenizer is the slow class without a backend_tokenizer; 5.x keeps the alias
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        with tempfile.TemporaryDirectory() as d:  # transformers derives the BPE merges from the pieces
            shutil.copyfile(model_path, os.path.join(d, "tokenizer.model"))
            backend = LlamaTokenizerFast.from_pretrained(d).backend_tokenizer
    elif trainer.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        backend = Tokenizer(Unigram([(p.piece, p.score) for p in proto.pieces], trainer.unk_id,
                                    byte_fallback=trainer.byte_fallback))
    else:
        raise ValueError(f"{model_path}: SentencePiece model type {trainer.model_type} cannot be exported")
    norm = [normalizers.NFKC()] if spec.name.startswith("nmt_nfkc") else []
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(norm)
    backend.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(dec + ([decoders.Strip(content=" ", left=1)] if spec.add_dummy_prefix else []))
    piece = {i: p.piece for i, p in enumerate(proto.pieces)}
    special = {k: piece.get(getattr(trainer, f"{k}_id")) for k in ("bos", "eos", "unk", "pad")}
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True,
                                   **{f"{k}_token": v for k, v in special.items() if v is not None})


def save_hf_tokenizer(model_path: str, out: str, model_max_length: int | None = None) -> None:
    """Write the exported tokenizer (tokenizer.json + config) and the SentencePiece model itself into `out`.
    `model_max_length` (the model's seq_len) makes `truncation=True` give sequences the model can take."""
    tok = hf_tokenizer(model_path)
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    tok.save_pretrained(out)
    # transformers 5 names its generic fast class "TokenizersBackend", which 4.x does not know; both load the
    # same tokenizer.json under the name PreTrainedTokenizerFast
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    shutil.copyfile(model_path, os.path.join(out, "tokenizer.model"))
