"""Our SentencePiece tokenizer as a Hugging Face tokenizer folder (the tokenizer half of `to-hf`)."""
from __future__ import annotations

import os
import shutil
import tempfile


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
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        with tempfile.TemporaryDirectory() as d:  # transformers derives the BPE merges from the pieces
            shutil.copyfile(model_path, os.path.join(d, "tokenizer.model"))
            backend = LlamaTokenizer.from_pretrained(d).backend_tokenizer
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


def save_hf_tokenizer(model_path: str, out: str) -> None:
    """Write the exported tokenizer (tokenizer.json + config) and the SentencePiece model itself into `out`."""
    hf_tokenizer(model_path).save_pretrained(out)
    shutil.copyfile(model_path, os.path.join(out, "tokenizer.model"))
