//! Where a field is in YAML text: the line and column of every mapping key and sequence
//! item, by the field path that errors name (`spec.rules[0].backendRefs[1].weight`), so
//! that an editor can mark the line and a terminal can name it.
//!
//! serde's YAML values carry no positions, so the text is read a second time, as events
//! with their positions, only when there is an error to place.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

use crate::parse::ConfigError;

/// A line and a column, both counted from 1.
pub type Position = (usize, usize);

/// The positions of every field of every document of one text.
#[derive(Debug, Default)]
pub struct Positions {
    /// One map per document, in order: field path → where its key (or item) is.
    documents: Vec<HashMap<String, Position>>,
}

impl Positions {
    /// Reads `text`; `None` when it is no YAML that can be read.
    pub fn of(text: &str) -> Option<Positions> {
        let mut walker = Walker::default();
        Parser::new_from_str(text).load(&mut walker, true).ok()?;
        Some(walker.positions)
    }

    /// Where the field `path` of document `index` (from 1) is; for a field the document
    /// does not have (a required one missing), where the nearest field around it is.
    pub fn find(&self, index: usize, path: &str) -> Option<Position> {
        let fields = self.documents.get(index.checked_sub(1)?)?;
        let mut path = path;
        loop {
            if let Some(position) = fields.get(path) {
                return Some(*position);
            }
            if path.is_empty() {
                return None;
            }
            // The parent: drop the last `.key` or `[index]`.
            path = &path[..path.rfind(['.', '[']).unwrap_or(0)];
        }
    }
}

/// Fills in the line and column of every error in `errors` that has none, from `text`,
/// the source they were all found in.
pub fn locate_errors(text: &str, errors: &mut [ConfigError]) {
    if errors.iter().all(|e| e.line.is_some()) {
        return;
    }
    let Some(positions) = Positions::of(text) else { return };
    for error in errors.iter_mut().filter(|e| e.line.is_none()) {
        if let Some((line, column)) = positions.find(error.index, &error.path) {
            error.line = Some(line);
            error.column = Some(column);
        }
    }
}

/// A collection being read, and the path of the node it is.
enum Frame {
    Mapping { path: String, key: Option<String> },
    Sequence { path: String, next: usize },
}

#[derive(Default)]
struct Walker {
    positions: Positions,
    stack: Vec<Frame>,
}

impl Walker {
    /// The path of the node starting now, recorded where it is (a key's position stands
    /// for its value), and the frame's state moved past it. A collection is recorded at
    /// its first key or item instead: the parser marks a block collection's start past
    /// it.
    fn node(&mut self, mark: Marker, collection: bool) -> String {
        let position = (mark.line().max(1), mark.col() + 1);
        let fields = match self.positions.documents.last_mut() {
            Some(fields) => fields,
            None => return String::new(),
        };
        match self.stack.last_mut() {
            None => String::new(),
            Some(Frame::Mapping { path, key }) => match key.take() {
                // A value: its key was recorded.
                Some(key) => join(path, &key),
                None => String::new(),
            },
            Some(Frame::Sequence { path, next }) => {
                let item = format!("{path}[{next}]");
                *next += 1;
                if !collection {
                    fields.entry(item.clone()).or_insert(position);
                }
                item
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::DocumentStart => {
                self.positions.documents.push(HashMap::new());
                self.stack.clear();
            }
            Event::MappingStart(..) => {
                let path = self.node(mark, true);
                self.stack.push(Frame::Mapping { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.node(mark, true);
                self.stack.push(Frame::Sequence { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Scalar(text, ..) => {
                let position = (mark.line().max(1), mark.col() + 1);
                match self.stack.last_mut() {
                    Some(Frame::Mapping { path, key: key @ None }) => {
                        // A key: it stands for its value, and the first for its mapping.
                        if let Some(fields) = self.positions.documents.last_mut() {
                            fields.entry(path.clone()).or_insert(position);
                            fields.entry(join(path, &text)).or_insert(position);
                        }
                        *key = Some(text);
                    }
                    _ => {
                        self.node(mark, false);
                    }
                }
            }
            Event::Alias(_) => {
                self.node(mark, false);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
apiVersion: weft.dev/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports:
  - port: 80
  - {port: 81, protocol: bogus}
---
kind: HTTPRoute
spec:
  rules:
    - backendRefs:
        - name: a
          weight: -1
";

    #[test]
    fn fields_are_found_by_their_paths() {
        let positions = Positions::of(TEXT).expect("YAML");
        assert_eq!(positions.find(1, "kind"), Some((2, 1)));
        assert_eq!(positions.find(1, "metadata.name"), Some((3, 12)), "in a flow mapping");
        assert_eq!(positions.find(1, "spec.ports[0]"), Some((6, 5)));
        assert_eq!(positions.find(1, "spec.ports[0].port"), Some((6, 5)));
        assert_eq!(positions.find(1, "spec.ports[1].protocol"), Some((7, 16)));
        assert_eq!(positions.find(2, "spec.rules[0].backendRefs[0].weight"), Some((14, 11)));
        // A field that is not there: the nearest one around it.
        assert_eq!(positions.find(2, "spec.rules[0].backendRefs[0].port"), Some((13, 11)));
        assert_eq!(positions.find(1, "spec.nothing[3]"), Some((4, 1)));
        assert_eq!(positions.find(3, "kind"), None, "no third document");
        assert!(Positions::of("a: [unclosed").is_none());
    }
}
