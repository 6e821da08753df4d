//! Incremental detokenization (the prefix/read-offset scheme of text-generation-inference).
//!
//! Decoding a growing id list token by token can split a multi-byte character across tokens;
//! byte-level decoders render the incomplete tail as U+FFFD. The stream decodes a short window
//! of recent ids and emits only the new suffix, and only once it no longer ends in U+FFFD.
//! Concatenating everything emitted plus [`DetokStream::flush`] equals decoding all ids at once.

use super::TextError;

pub struct DetokStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl DetokStream {
    pub fn new(skip_special: bool) -> Self {
        DetokStream {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special,
        }
    }

    fn decode(&self, t: &tokenizers::Tokenizer, ids: &[u32]) -> Result<String, TextError> {
        t.decode(ids, self.skip_special)
            .map_err(|e| TextError::Tokenizer(e.to_string()))
    }

    /// Adds a token; returns newly complete text, if any.
    pub fn push(
        &mut self,
        t: &tokenizers::Tokenizer,
        id: u32,
    ) -> Result<Option<String>, TextError> {
        self.ids.push(id);
        let prefix = self.decode(t, &self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(t, &self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Everything not yet emitted (an incomplete character becomes U+FFFD).
    pub fn flush(&mut self, t: &tokenizers::Tokenizer) -> Result<String, TextError> {
        let prefix = self.decode(t, &self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(t, &self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(match full.get(prefix.len()..) {
            Some(s) if full.starts_with(&prefix) => s.to_string(),
            _ => full,
        })
    }
}
