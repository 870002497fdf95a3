//! The CLIP byte-level BPE tokenizer, as transformers' `CLIPTokenizer` (tokenizers backend) runs it,
//! read from a model folder's vocab.json + merges.txt (+ tokenizer_config.json /
//! special_tokens_map.json for the special tokens and the maximum length).
//!
//! The steps, in the reference's order:
//! 1. special ("added") tokens are split out of the raw text first — `<|startoftext|>`,
//!    `<|endoftext|>` and the pad token. SDXL's tokenizer_2 pads with "!", which is therefore an
//!    added token too: every "!" in a prompt becomes id 0 on its own instead of joining a BPE word
//!    (so "hello!!" tokenizes differently by the two SDXL tokenizers);
//! 2. the rest is normalized: NFC, every whitespace run to one space, lowercase;
//! 3. pre-tokenized: the pieces are the matches of CLIP's pattern (letters runs, single digits,
//!    runs of other non-space characters, English contractions);
//! 4. each piece's UTF-8 bytes are mapped to printable characters (GPT-2's bytes→unicode table),
//!    the last character gets the `</w>` end-of-word suffix, and BPE merges the adjacent pair of
//!    lowest merge rank until none applies;
//! 5. SDXL's call (padding="max_length", truncation=True, max_length 77): bos, at most 75 content
//!    tokens, eos, then the pad id up to 77.

use std::collections::HashMap;
use std::path::Path;

use engine::{Device, Error, Result, Tensor};
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokenization pattern (transformers' CLIPTokenizer Split pattern).
const CLIP_PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The ByteLevel pre-tokenizer's GPT-2 pattern, restricted to text without whitespace (CLIP's
/// pieces never hold any, so its whitespace alternatives and optional leading space never match).
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// GPT-2's reversible map from the 256 byte values to printable characters: printable Latin-1
/// bytes map to themselves, the others to 256, 257, ... in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\u{fffd}');
    }
    table
}

/// A special token split out of the text before (normalized = false) or after (true) normalization.
#[derive(Clone, Debug)]
struct AddedToken {
    content: String,
    id: u32,
    normalized: bool,
}

#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// (left, right) -> (rank, id of the merged token).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_chars: [char; 256],
    /// Sorted longest first, so that the scan finds the leftmost-longest match.
    added: Vec<AddedToken>,
    clip_re: Regex,
    gpt2_re: Regex,
    ws_re: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    max_length: usize,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&read_text(path)?).map_err(|e| Error::File { path: path.display().to_string(), msg: format!("invalid JSON: {e}") })
}

/// A token entry of a tokenizer config: a plain string or an object with "content".
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// A tokenizer from `vocab.json` and `merges.txt` with CLIP's defaults: bos `<|startoftext|>`,
    /// eos = unk = pad = `<|endoftext|>`, 77 tokens.
    pub fn from_files(vocab_path: &Path, merges_path: &Path) -> Result<ClipTokenizer> {
        let vocab_json = read_json(vocab_path)?;
        let obj = vocab_json.as_object().ok_or_else(|| Error::File { path: vocab_path.display().to_string(), msg: "expected a JSON object of token -> id".into() })?;
        let mut vocab = HashMap::with_capacity(obj.len());
        for (token, id) in obj {
            let id = id.as_u64().filter(|&i| i <= u32::MAX as u64).ok_or_else(|| Error::File { path: vocab_path.display().to_string(), msg: format!("token {token:?}: id is not a non-negative integer") })?;
            vocab.insert(token.clone(), id as u32);
        }

        let text = read_text(merges_path)?;
        let mut merges = HashMap::new();
        let mut rank = 0u32;
        for (n, line) in text.lines().enumerate() {
            // The first line is a "#version: ..." header; blank lines carry nothing.
            if (n == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let bad = |msg: String| Error::File { path: merges_path.display().to_string(), msg: format!("line {}: {msg}", n + 1) };
            let mut parts = line.split(' ');
            let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad(format!("expected two tokens separated by a space, found {line:?}")));
            };
            let id_of = |t: &str| vocab.get(t).copied().ok_or_else(|| bad(format!("token {t:?} is not in the vocabulary")));
            let merged = format!("{a}{b}");
            let key = (id_of(a)?, id_of(b)?);
            let new_id = id_of(&merged)?;
            // A repeated pair keeps its first (lowest) rank.
            merges.entry(key).or_insert((rank, new_id));
            rank += 1;
        }

        let id_of = |t: &str| vocab.get(t).copied().ok_or_else(|| Error::File { path: vocab_path.display().to_string(), msg: format!("special token {t:?} is not in the vocabulary") });
        let (bos_id, eos_id) = (id_of(BOS)?, id_of(EOS)?);
        let mut tok = ClipTokenizer {
            merges,
            byte_chars: bytes_to_unicode(),
            added: Vec::new(),
            clip_re: Regex::new(CLIP_PATTERN).map_err(|e| Error::msg(format!("tokenizer pattern: {e}")))?,
            gpt2_re: Regex::new(GPT2_PATTERN).map_err(|e| Error::msg(format!("tokenizer pattern: {e}")))?,
            ws_re: Regex::new(r"\s+").map_err(|e| Error::msg(format!("tokenizer pattern: {e}")))?,
            bos_id,
            eos_id,
            pad_id: eos_id,
            unk_id: eos_id,
            max_length: 77,
            vocab,
        };
        tok.add_token(BOS, false)?;
        tok.add_token(EOS, false)?;
        Ok(tok)
    }

    /// A tokenizer from a model folder (a diffusers pipeline's `tokenizer/` or `tokenizer_2/`):
    /// vocab.json, merges.txt, and if present tokenizer_config.json (pad/bos/eos/unk tokens,
    /// added_tokens_decoder, model_max_length) and special_tokens_map.json.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<ClipTokenizer> {
        let dir = dir.as_ref();
        let mut tok = ClipTokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))?;
        // special_tokens_map.json first, tokenizer_config.json overrides (as transformers reads them).
        let mut configs = Vec::new();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(name);
            if path.exists() {
                configs.push((path.clone(), read_json(&path)?));
            }
        }
        for (path, cfg) in &configs {
            if let Some(decoder) = cfg.get("added_tokens_decoder").and_then(|d| d.as_object()) {
                for entry in decoder.values() {
                    let Some(content) = token_content(entry) else {
                        return Err(Error::File { path: path.display().to_string(), msg: "added_tokens_decoder entry without content".into() });
                    };
                    let normalized = entry.get("normalized").and_then(|n| n.as_bool()).unwrap_or(false);
                    tok.add_token(&content, normalized)?;
                }
            }
            for (key, slot) in [("bos_token", 0), ("eos_token", 1), ("unk_token", 2), ("pad_token", 3)] {
                let Some(content) = cfg.get(key).and_then(token_content) else { continue };
                let id = tok.add_token(&content, false)?;
                match slot {
                    0 => tok.bos_id = id,
                    1 => tok.eos_id = id,
                    2 => tok.unk_id = id,
                    _ => tok.pad_id = id,
                }
            }
            if let Some(n) = cfg.get("model_max_length").and_then(|n| n.as_f64()) {
                // transformers writes a huge number when no maximum is set; CLIP's position table
                // holds 77.
                tok.max_length = if (1.0..1e6).contains(&n) { n as usize } else { 77 };
            }
        }
        Ok(tok)
    }

    /// Registers `content` as a special token (split out of the text as a whole) and returns its
    /// id; a token already registered keeps its first `normalized` flag.
    fn add_token(&mut self, content: &str, normalized: bool) -> Result<u32> {
        let id = *self.vocab.get(content).ok_or_else(|| Error::msg(format!("tokenizer: special token {content:?} is not in the vocabulary")))?;
        if !self.added.iter().any(|a| a.content == content) {
            self.added.push(AddedToken { content: content.to_string(), id, normalized });
            self.added.sort_by_key(|a| std::cmp::Reverse(a.content.len()));
        }
        Ok(id)
    }

    /// Replaces the pad token (it becomes a special token, as transformers' `pad_token=` does).
    pub fn with_pad_token(mut self, content: &str) -> Result<ClipTokenizer> {
        self.pad_id = self.add_token(content, false)?;
        Ok(self)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Splits `text` on the added tokens whose `normalized` flag is `normalized`: text runs are
    /// passed to `on_text`, special tokens pushed as ids (leftmost-longest match).
    fn split_added(&self, text: &str, normalized: bool, ids: &mut Vec<u32>, on_text: &mut dyn FnMut(&str, &mut Vec<u32>)) {
        let mut start = 0;
        let mut i = 0;
        while i < text.len() {
            let rest = &text[i..];
            if let Some(a) = self.added.iter().find(|a| a.normalized == normalized && rest.starts_with(a.content.as_str())) {
                if start < i {
                    on_text(&text[start..i], ids);
                }
                ids.push(a.id);
                i += a.content.len();
                start = i;
            } else {
                i += rest.chars().next().map_or(1, char::len_utf8);
            }
        }
        if start < text.len() {
            on_text(&text[start..], ids);
        }
    }

    /// The content tokens of `text` (no bos/eos, no truncation).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.split_added(text, false, &mut ids, &mut |raw, ids| {
            let normalized: String = raw.nfc().collect();
            let normalized = self.ws_re.replace_all(&normalized, " ").to_lowercase();
            self.split_added(&normalized, true, ids, &mut |segment, ids| {
                for piece in self.clip_re.find_iter(segment) {
                    for word in self.gpt2_re.find_iter(piece.as_str()) {
                        self.bpe(word.as_str(), ids);
                    }
                }
            });
        });
        ids
    }

    /// BPE of one pre-tokenized word, appending its ids.
    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        let chars: Vec<char> = word.bytes().map(|b| self.byte_chars[b as usize]).collect();
        let mut symbols: Vec<u32> = Vec::with_capacity(chars.len());
        for (i, c) in chars.iter().enumerate() {
            let mut s = c.to_string();
            if i + 1 == chars.len() {
                s.push_str("</w>");
            }
            symbols.push(self.vocab.get(&s).copied().unwrap_or(self.unk_id));
        }
        loop {
            // The adjacent pair of lowest rank; every occurrence of it is merged left to right.
            let best = symbols.windows(2).filter_map(|p| self.merges.get(&(p[0], p[1])).map(|&(rank, id)| (rank, (p[0], p[1]), id))).min_by_key(|m| m.0);
            let Some((_, pair, merged)) = best else { break };
            let mut next = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = next;
        }
        out.extend(symbols);
    }

    /// bos, the content tokens, eos — untruncated (transformers' `tokenizer(text).input_ids`).
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos_id];
        ids.extend(self.encode(text));
        ids.push(self.eos_id);
        ids
    }

    /// As SDXL calls the tokenizers: exactly `max_length` ids — bos, at most max_length - 2 content
    /// tokens, eos, then the pad id.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let keep = self.max_length.saturating_sub(2);
        let content = self.encode(text);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(content.iter().take(keep));
        ids.push(self.eos_id);
        ids.resize(self.max_length.max(ids.len()), self.pad_id);
        ids
    }

    /// `encode_padded` of every text as an I64 tensor [B, max_length].
    pub fn encode_batch(&self, texts: &[&str], device: Device) -> Result<Tensor> {
        let mut data = Vec::with_capacity(texts.len() * self.max_length);
        for t in texts {
            data.extend(self.encode_padded(t).into_iter().map(i64::from));
        }
        Tensor::from_vec(data, &[texts.len(), self.max_length], device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_starting_at_bang() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t[b' ' as usize], '\u{120}');
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    fn tiny() -> ClipTokenizer {
        // A folder per call: tests run in parallel, and one rewriting the files while another
        // reads them made a reader see a truncated vocab.json.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("clip_tok_test_{}_{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let table = bytes_to_unicode();
        let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        vocab.extend(table.iter().map(|c| format!("{c}</w>")));
        let merges = [("a", "b</w>"), ("c", "ab</w>"), ("a", "a")];
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(BOS.into());
        vocab.push(EOS.into());
        let json: serde_json::Map<String, serde_json::Value> = vocab.iter().enumerate().map(|(i, v)| (v.clone(), serde_json::Value::from(i))).collect();
        std::fs::write(dir.join("vocab.json"), serde_json::Value::Object(json).to_string()).unwrap();
        let m: String = merges.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
        std::fs::write(dir.join("merges.txt"), format!("#version: 0.2\n{m}")).unwrap();
        ClipTokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap()
    }

    #[test]
    fn merges_by_rank_and_pads() {
        let t = tiny();
        let id = |s: &str| t.vocab[s];
        // "cab" -> c + ab</w> (rank 0) -> cab</w> (rank 1).
        assert_eq!(t.encode("CAB"), vec![id("cab</w>")]);
        // "aaa" -> (a a) a</w>: the pair merges left to right, non-overlapping.
        assert_eq!(t.encode("aaa"), vec![id("aa"), id("a</w>")]);
        let padded = t.encode_padded("cab cab");
        assert_eq!(padded.len(), 77);
        assert_eq!(&padded[..4], &[t.bos_id(), id("cab</w>"), id("cab</w>"), t.eos_id()]);
        assert!(padded[4..].iter().all(|&p| p == t.eos_id()));
        let t2 = t.clone().with_pad_token("!").unwrap();
        assert_eq!(t2.encode_padded("")[2..], [id("!"); 75]);
        // "!" is now a special token of its own.
        assert_eq!(t2.encode("ab!!"), vec![id("ab</w>"), id("!"), id("!")]);
        assert_eq!(t.encode("ab!!"), vec![id("ab</w>"), id("!"), id("!</w>")]);
    }

    #[test]
    fn truncates_to_max_length() {
        let t = tiny();
        let long = "cab ".repeat(100);
        let ids = t.encode_padded(&long);
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], t.eos_id());
        assert_eq!(t.encode_with_special(&long).len(), 102);
    }
}
