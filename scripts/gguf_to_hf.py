#!/usr/bin/env python3
"""Convert a small Llama checkpoint to a Hugging Face Llama model directory.

Inputs (auto-detected by magic bytes):
  * GGUF (llama architecture), tensor types F32 / F16 / Q8_0 / Q4_0 / Q4_1
    -> dequantized to float32.  Tokenizer (gpt2/BPE or llama/SPM) is rebuilt
    from the GGUF metadata into tokenizer.json.
  * llama2.c legacy checkpoint (.bin, 7 x int32 header, float32 weights,
    e.g. stories260K.bin / stories15M.bin).  Pass --tokenizer tok512.bin /
    tokenizer.bin to also write a tokenizer.json (llama2.c tokenizer.bin
    format: int32 max_token_length, then per token: float32 score, int32 len,
    bytes).

Output directory: config.json, generation_config.json, model.safetensors
(HF names), and tokenizer.json + tokenizer_config.json when a tokenizer is
available.

Q/K layout: both llama2.c .bin files and GGUF files store wq/wk in Meta's
interleaved-RoPE layout (rotary pairs (2i, 2i+1) inside each head).  HF
Llama uses rotate_half (pairs (i, i + head_dim/2)), so q_proj/k_proj are
permuted with
    w.reshape(n_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out, in)
(n_heads = n_kv_heads for k_proj).  This is the permute of
transformers' convert_llama_weights_to_hf.py and the inverse of
llama.cpp's convert_hf_to_gguf.py LlamaModel.permute.

Only numpy and safetensors are needed.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import save_file


# ----------------------------------------------------------------------------
# Q/K permutation (Meta interleaved -> HF rotate_half)

def meta_to_hf(w, n_heads):
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    assert head_dim * n_heads == out_dim and head_dim % 2 == 0
    return np.ascontiguousarray(
        w.reshape(n_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim))


# ----------------------------------------------------------------------------
# GGUF reader

GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 0, 1, 2, 3, 8
# type id -> (block elements, block bytes)
GGML_BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q4_0: (32, 18),
              GGML_Q4_1: (32, 20), GGML_Q8_0: (32, 34)}

_GGUF_SCALAR = {0: '<B', 1: '<b', 2: '<H', 3: '<h', 4: '<I', 5: '<i', 6: '<f',
                7: '<?', 10: '<Q', 11: '<q', 12: '<d'}


class GGUF:
    def __init__(self, path):
        self.buf = memoryview(open(path, 'rb').read())
        self.pos = 0
        magic = bytes(self.buf[:4])
        if magic != b'GGUF':
            raise ValueError('not a GGUF file')
        self.pos = 4
        version = self._read('<I')
        if version < 2:
            raise ValueError(f'GGUF v{version} unsupported')
        n_tensors = self._read('<Q')
        n_kv = self._read('<Q')
        self.meta = {}
        for _ in range(n_kv):
            key = self._str()
            self.meta[key] = self._value(self._read('<I'))
        self.tensor_info = []
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._read('<I')
            dims = [self._read('<Q') for _ in range(n_dims)]
            ttype = self._read('<I')
            offset = self._read('<Q')
            self.tensor_info.append((name, dims, ttype, offset))
        align = self.meta.get('general.alignment', 32)
        self.data_start = (self.pos + align - 1) // align * align

    def _read(self, fmt):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def _str(self):
        n = self._read('<Q')
        s = bytes(self.buf[self.pos:self.pos + n]).decode('utf-8', errors='surrogateescape')
        self.pos += n
        return s

    def _value(self, vtype):
        if vtype in _GGUF_SCALAR:
            return self._read(_GGUF_SCALAR[vtype])
        if vtype == 8:
            return self._str()
        if vtype == 9:
            etype = self._read('<I')
            n = self._read('<Q')
            if etype in _GGUF_SCALAR:  # fast path for numeric arrays
                dt = np.dtype(_GGUF_SCALAR[etype])
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos += n * dt.itemsize
                return arr
            return [self._value(etype) for _ in range(n)]
        raise ValueError(f'unknown GGUF value type {vtype}')

    def tensors(self):
        """Yield (name, float32 array shaped (ne[-1], ..., ne[0]))."""
        for name, dims, ttype, offset in self.tensor_info:
            n = int(np.prod(dims))
            if ttype not in GGML_BLOCK:
                raise ValueError(f'{name}: ggml type {ttype} not supported by this script')
            be, bb = GGML_BLOCK[ttype]
            nbytes = n // be * bb
            raw = np.frombuffer(self.buf, dtype=np.uint8, count=nbytes,
                                offset=self.data_start + offset)
            yield name, dequantize(raw, ttype, n).reshape(list(reversed(dims)))


def dequantize(raw, ttype, n):
    if ttype == GGML_F32:
        return raw.view('<f4').astype(np.float32)
    if ttype == GGML_F16:
        return raw.view('<f2').astype(np.float32)
    be, bb = GGML_BLOCK[ttype]
    blocks = raw.reshape(-1, bb)
    d = blocks[:, 0:2].copy().view('<f2').astype(np.float32)          # (nb, 1)
    if ttype == GGML_Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        out = d * q
    elif ttype in (GGML_Q4_0, GGML_Q4_1):
        qs = blocks[:, 4:] if ttype == GGML_Q4_1 else blocks[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (nb, 32)
        if ttype == GGML_Q4_1:
            m = blocks[:, 2:4].copy().view('<f2').astype(np.float32)
            out = q * d + m
        else:
            out = (q - 8.0) * d
    else:
        raise ValueError(ttype)
    return out.reshape(n)


def convert_gguf(path, outdir):
    g = GGUF(path)
    md = g.meta
    arch = md['general.architecture']
    if arch != 'llama':
        raise SystemExit(f'architecture {arch!r} is not llama')
    P = arch + '.'
    dim = int(md[P + 'embedding_length'])
    n_layers = int(md[P + 'block_count'])
    n_heads = int(md[P + 'attention.head_count'])
    n_kv = int(md.get(P + 'attention.head_count_kv', n_heads))
    hidden = int(md[P + 'feed_forward_length'])
    ctx = int(md[P + 'context_length'])
    eps = float(f"{float(md[P + 'attention.layer_norm_rms_epsilon']):.7g}")  # 1e-05, not 9.9999997e-06
    theta = float(md.get(P + 'rope.freq_base', 10000.0))
    tokens = md['tokenizer.ggml.tokens']
    vocab = int(md.get(P + 'vocab_size', len(tokens)))
    head_dim = dim // n_heads
    rope_dims = int(md.get(P + 'rope.dimension_count', head_dim))
    if rope_dims != head_dim:
        raise SystemExit('partial rotary not supported')

    names = {'token_embd.weight': 'model.embed_tokens.weight',
             'output_norm.weight': 'model.norm.weight',
             'output.weight': 'lm_head.weight'}
    per_layer = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
                 'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
                 'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
                 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
                 'ffn_down': 'mlp.down_proj'}
    sd = {}
    for name, arr in g.tensors():
        if name in names:
            hf = names[name]
        elif name.startswith('blk.'):
            _, i, kind, _w = name.split('.')
            if kind not in per_layer:
                print(f'skipping {name}', file=sys.stderr)
                continue
            hf = f'model.layers.{i}.{per_layer[kind]}.weight'
            if kind == 'attn_q':
                arr = meta_to_hf(arr, n_heads)
            elif kind == 'attn_k':
                arr = meta_to_hf(arr, n_kv)
        else:
            print(f'skipping {name}', file=sys.stderr)
            continue
        sd[hf] = np.ascontiguousarray(arr, dtype=np.float32)
    tied = 'lm_head.weight' not in sd
    bos = md.get('tokenizer.ggml.bos_token_id')
    eos = md.get('tokenizer.ggml.eos_token_id')
    write_model(outdir, sd, dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads,
                                 n_kv=n_kv, vocab=vocab, ctx=ctx, eps=eps, theta=theta,
                                 tied=tied, bos=bos, eos=eos))
    tok = gguf_tokenizer(md)
    if tok is not None:
        write_tokenizer(outdir, tok, md)


def gguf_tokenizer(md):
    model = md.get('tokenizer.ggml.model')
    tokens = md['tokenizer.ggml.tokens']
    types = md.get('tokenizer.ggml.token_type')
    added = []
    for i, t in enumerate(tokens):
        if types is not None and int(types[i]) in (3, 4):  # CONTROL, USER_DEFINED
            added.append({'id': i, 'content': t, 'single_word': False, 'lstrip': False,
                          'rstrip': False, 'normalized': False, 'special': int(types[i]) == 3})
    if model == 'gpt2':
        pre = md.get('tokenizer.ggml.pre', 'default')
        bl = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True,
              'use_regex': True}
        if pre in ('smollm', 'starcoder', 'refact'):
            # SmolLM/StarCoder: every digit is its own pre-token, then GPT-2 byte-level regex.
            pre_tok = {'type': 'Sequence', 'pretokenizers': [
                {'type': 'Digits', 'individual_digits': True}, bl]}
        elif pre in ('default', 'gpt-2', 'gpt2'):
            pre_tok = bl
        else:
            print(f'warning: GGUF pre-tokenizer {pre!r} not mapped; using plain GPT-2 ByteLevel',
                  file=sys.stderr)
            pre_tok = bl
        return {
            'version': '1.0', 'truncation': None, 'padding': None,
            'added_tokens': added, 'normalizer': None, 'pre_tokenizer': pre_tok,
            'post_processor': {'type': 'ByteLevel', 'add_prefix_space': True,
                               'trim_offsets': False, 'use_regex': True},
            'decoder': {'type': 'ByteLevel', 'add_prefix_space': True, 'trim_offsets': True,
                        'use_regex': True},
            'model': {'type': 'BPE', 'dropout': None, 'unk_token': None,
                      'continuing_subword_prefix': None, 'end_of_word_suffix': None,
                      'fuse_unk': False, 'byte_fallback': False, 'ignore_merges': False,
                      'vocab': {t: i for i, t in enumerate(tokens)},
                      'merges': list(md['tokenizer.ggml.merges'])},
        }
    if model == 'llama':
        scores = md.get('tokenizer.ggml.scores')
        return spm_tokenizer_json(list(tokens), [float(s) for s in scores],
                                  unk=int(md.get('tokenizer.ggml.unknown_token_id', 0)),
                                  bos=md.get('tokenizer.ggml.bos_token_id', 1),
                                  eos=md.get('tokenizer.ggml.eos_token_id', 2))
    print(f'tokenizer model {model!r} not converted', file=sys.stderr)
    return None


# ----------------------------------------------------------------------------
# llama2.c legacy checkpoint + tokenizer.bin

def convert_llama2c(path, outdir, tokenizer_path=None):
    raw = open(path, 'rb').read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack('<7i', raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // n_heads
    kv_dim = n_kv * head_dim
    w = np.frombuffer(raw, dtype='<f4', offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        a = w[pos:pos + n].reshape(shape).astype(np.float32)
        pos += n
        return a

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)            # (out=n_heads*head_dim, in=dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)         # gate
    w2 = take(n_layers, dim, hidden)         # down
    w3 = take(n_layers, hidden, dim)         # up
    rms_final = take(dim)
    take(seq_len, head_dim // 2)             # freq_cis_real (unused, legacy)
    take(seq_len, head_dim // 2)             # freq_cis_imag
    sd = {'model.embed_tokens.weight': emb, 'model.norm.weight': rms_final}
    if not shared:
        sd['lm_head.weight'] = take(vocab, dim)
    if pos != w.size:
        raise SystemExit(f'{path}: {w.size - pos} trailing floats; not a legacy llama2.c file?')
    for i in range(n_layers):
        p = f'model.layers.{i}.'
        sd[p + 'input_layernorm.weight'] = rms_att[i]
        sd[p + 'post_attention_layernorm.weight'] = rms_ffn[i]
        sd[p + 'self_attn.q_proj.weight'] = meta_to_hf(wq[i], n_heads)
        sd[p + 'self_attn.k_proj.weight'] = meta_to_hf(wk[i], n_kv)
        sd[p + 'self_attn.v_proj.weight'] = wv[i]
        sd[p + 'self_attn.o_proj.weight'] = wo[i]
        sd[p + 'mlp.gate_proj.weight'] = w1[i]
        sd[p + 'mlp.down_proj.weight'] = w2[i]
        sd[p + 'mlp.up_proj.weight'] = w3[i]
    sd = {k: np.ascontiguousarray(v) for k, v in sd.items()}
    write_model(outdir, sd, dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads,
                                 n_kv=n_kv, vocab=vocab, ctx=seq_len, eps=1e-5, theta=10000.0,
                                 tied=shared, bos=1, eos=2))
    if tokenizer_path:
        pieces, scores = read_llama2c_tokenizer(tokenizer_path, vocab)
        write_tokenizer(outdir, spm_tokenizer_json(pieces, scores), {})


def read_llama2c_tokenizer(path, vocab_size):
    raw = open(path, 'rb').read()
    pos = 4  # max_token_length
    pieces, scores = [], []
    for _ in range(vocab_size):
        score, n = struct.unpack_from('<fi', raw, pos)
        pos += 8
        pieces.append(raw[pos:pos + n])
        pos += n
        scores.append(score)
    return pieces, scores


def spm_tokenizer_json(pieces, scores, unk=0, bos=1, eos=2):
    """SentencePiece-BPE (Llama-2 style, byte_fallback) tokenizer.json.

    pieces: list of str (GGUF, '\u2581' for spaces) or bytes (llama2.c tokenizer.bin,
    where ' ' stands for '\u2581', and byte tokens are written as '<0xNN>').
    Merges are derived from the vocabulary, ordered by piece score (as in the
    Llama-2 conversion used by transformers)."""
    vocab = {}
    for i, p in enumerate(pieces):
        if isinstance(p, bytes):
            if i == unk:
                s = '<unk>'
            elif i == bos:
                s = '<s>'
            elif i == eos:
                s = '</s>'
            else:
                s = p.decode('utf-8', errors='replace').replace(' ', '\u2581')
        else:
            s = p
        vocab.setdefault(s, i)
    inv = {i: s for s, i in vocab.items()}
    special = {unk, bos, eos}
    merges = []
    for s, i in vocab.items():
        if i in special or (s.startswith('<0x') and s.endswith('>') and len(s) == 6):
            continue
        for k in range(1, len(s)):
            a, b = s[:k], s[k:]
            if a in vocab and b in vocab:
                merges.append((scores[i], vocab[a], vocab[b], a, b))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    added = [{'id': i, 'content': inv[i], 'single_word': False, 'lstrip': False,
              'rstrip': False, 'normalized': False, 'special': True}
             for i in sorted(special) if i in inv]
    return {
        'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added,
        'normalizer': {'type': 'Sequence', 'normalizers': [
            {'type': 'Prepend', 'prepend': '\u2581'},
            {'type': 'Replace', 'pattern': {'String': ' '}, 'content': '\u2581'}]},
        'pre_tokenizer': None,
        'post_processor': {'type': 'TemplateProcessing',
                           'single': [{'SpecialToken': {'id': inv[bos], 'type_id': 0}},
                                      {'Sequence': {'id': 'A', 'type_id': 0}}],
                           'pair': [{'SpecialToken': {'id': inv[bos], 'type_id': 0}},
                                    {'Sequence': {'id': 'A', 'type_id': 0}},
                                    {'SpecialToken': {'id': inv[bos], 'type_id': 1}},
                                    {'Sequence': {'id': 'B', 'type_id': 1}}],
                           'special_tokens': {inv[bos]: {'id': inv[bos], 'ids': [bos],
                                                         'tokens': [inv[bos]]}}},
        'decoder': {'type': 'Sequence', 'decoders': [
            {'type': 'Replace', 'pattern': {'String': '\u2581'}, 'content': ' '},
            {'type': 'ByteFallback'}, {'type': 'Fuse'},
            {'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0}]},
        'model': {'type': 'BPE', 'dropout': None, 'unk_token': inv.get(unk),
                  'continuing_subword_prefix': None, 'end_of_word_suffix': None,
                  'fuse_unk': True, 'byte_fallback': True, 'ignore_merges': False,
                  'vocab': vocab, 'merges': [[a, b] for _, _, _, a, b in merges]},
    }


# ----------------------------------------------------------------------------
# writers

def write_model(outdir, sd, c):
    os.makedirs(outdir, exist_ok=True)
    cfg = {
        'architectures': ['LlamaForCausalLM'],
        'attention_bias': False,
        'attention_dropout': 0.0,
        'bos_token_id': int(c['bos']) if c['bos'] is not None else 1,
        'eos_token_id': int(c['eos']) if c['eos'] is not None else 2,
        'head_dim': c['dim'] // c['n_heads'],
        'hidden_act': 'silu',
        'hidden_size': c['dim'],
        'initializer_range': 0.02,
        'intermediate_size': c['hidden'],
        'max_position_embeddings': c['ctx'],
        'mlp_bias': False,
        'model_type': 'llama',
        'num_attention_heads': c['n_heads'],
        'num_hidden_layers': c['n_layers'],
        'num_key_value_heads': c['n_kv'],
        'pretraining_tp': 1,
        'rms_norm_eps': c['eps'],
        'rope_scaling': None,
        'rope_theta': c['theta'],
        'tie_word_embeddings': bool(c['tied']),
        'torch_dtype': 'float32',
        'transformers_version': '4.46.0',
        'use_cache': True,
        'vocab_size': c['vocab'],
    }
    with open(os.path.join(outdir, 'config.json'), 'w') as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write('\n')
    with open(os.path.join(outdir, 'generation_config.json'), 'w') as f:
        json.dump({'bos_token_id': cfg['bos_token_id'], 'eos_token_id': cfg['eos_token_id'],
                   '_from_model_config': True, 'transformers_version': '4.46.0'}, f, indent=2)
        f.write('\n')
    save_file(sd, os.path.join(outdir, 'model.safetensors'), metadata={'format': 'pt'})
    print(f'wrote {outdir}: {len(sd)} tensors, '
          f'{sum(v.size for v in sd.values()):,} params, tied={cfg["tie_word_embeddings"]}')


def write_tokenizer(outdir, tok, md):
    with open(os.path.join(outdir, 'tokenizer.json'), 'w', encoding='utf-8') as f:
        json.dump(tok, f, ensure_ascii=False)
    ids = {t['id']: t['content'] for t in tok['added_tokens']}
    vocab_inv = {i: s for s, i in tok['model']['vocab'].items()}
    tc = {'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False,
          'model_max_length': 1000000000000000019884624838656}
    for key, name in (('bos_token', 'tokenizer.ggml.bos_token_id'),
                      ('eos_token', 'tokenizer.ggml.eos_token_id'),
                      ('unk_token', 'tokenizer.ggml.unknown_token_id'),
                      ('pad_token', 'tokenizer.ggml.padding_token_id')):
        if name in md:
            tc[key] = vocab_inv.get(int(md[name]))
    if 'tokenizer.chat_template' in md:
        tc['chat_template'] = md['tokenizer.chat_template']
    if 'tokenizer.ggml.add_bos_token' in md:
        tc['add_bos_token'] = bool(md['tokenizer.ggml.add_bos_token'])
    with open(os.path.join(outdir, 'tokenizer_config.json'), 'w') as f:
        json.dump(tc, f, indent=2)
        f.write('\n')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('checkpoint', help='.gguf or llama2.c .bin')
    ap.add_argument('outdir')
    ap.add_argument('--tokenizer', help='llama2.c tokenizer.bin / tok512.bin (llama2.c input only)')
    a = ap.parse_args()
    with open(a.checkpoint, 'rb') as f:
        magic = f.read(4)
    if magic == b'GGUF':
        convert_gguf(a.checkpoint, a.outdir)
    else:
        convert_llama2c(a.checkpoint, a.outdir, a.tokenizer)


if __name__ == '__main__':
    main()
