//! Stop strings over streamed text.
//!
//! Invariant: text that is, or could still become, part of a stop string is never emitted.
//! After a match, the emitted text is exactly the output up to (not including) the stop string.

pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds text; returns (text safe to emit, whether a stop string matched).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.held.push_str(text);
        // Earliest match wins.
        if let Some(i) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..i].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            let max = s.len().saturating_sub(1).min(self.held.len());
            for n in (1..=max).rev() {
                let start = self.held.len() - n;
                if self.held.is_char_boundary(start) && s.starts_with(&self.held[start..]) {
                    keep = keep.max(n);
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Releases held text at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (e, stopped) = m.push(p);
            out.push_str(&e);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces_never_leaks() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abc ST"), ("abc ".into(), false));
        assert_eq!(m.push("O"), ("".into(), false));
        assert_eq!(m.push("P tail"), ("".into(), true));
    }

    #[test]
    fn false_partial_match_is_released() {
        assert_eq!(
            run(&["STOP"], &["a ST", "ART b"]),
            ("a START b".into(), false)
        );
        assert_eq!(
            run(&["STOP"], &["ends with ST"]),
            ("ends with ST".into(), false)
        );
    }

    #[test]
    fn earliest_of_several_stops_wins_and_unicode_is_safe() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".into(), true)
        );
        assert_eq!(run(&["é!"], &["caf", "é", "!x"]), ("caf".into(), true));
        assert_eq!(run(&["ab"], &["ééa"]), ("ééa".into(), false));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::fuzz_cases()))]

        /// Any text in any pieces against any stops: what is emitted is a prefix of the text
        /// holding no stop string; on a stop it is exactly the text before a stop string
        /// that starts there; without one it is the whole text.
        #[test]
        fn fuzz_stop_matching(
            pieces in proptest::collection::vec("[abé ]{0,5}", 0..12),
            stops in proptest::collection::vec("[abé]{0,3}", 0..4),
        ) {
            let full: String = pieces.concat();
            let stop_refs: Vec<&str> = stops.iter().map(|s| s.as_str()).collect();
            let piece_refs: Vec<&str> = pieces.iter().map(|s| s.as_str()).collect();
            let (out, stopped) = run(&stop_refs, &piece_refs);
            proptest::prop_assert!(full.starts_with(&out), "{out:?} is not a prefix of {full:?}");
            for s in stops.iter().filter(|s| !s.is_empty()) {
                proptest::prop_assert!(!out.contains(s.as_str()), "{out:?} leaks {s:?}");
            }
            if stopped {
                let rest = &full[out.len()..];
                proptest::prop_assert!(stops.iter().any(|s| !s.is_empty() && rest.starts_with(s.as_str())));
            } else {
                proptest::prop_assert_eq!(&out, &full);
            }
        }
    }
}
