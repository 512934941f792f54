//! The read-your-writes token: the event-log positions a command wrote.

/// Where a command's last event landed: a read model has caught up with the command once
/// its checkpoint for this topic partition is past `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// An opaque read-your-writes token: the event-topic positions a command wrote.
/// Format `t1.<stream>.<partition>.<offset>[~...]`; clients must not parse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencyToken {
    pub stream: String,
    pub positions: Vec<Position>,
}

impl ConsistencyToken {
    /// Encodes the token.
    pub fn encode(&self) -> String {
        let parts: Vec<String> = self
            .positions
            .iter()
            .map(|p| format!("t1.{}.{}.{}", self.stream, p.partition, p.offset))
            .collect();
        parts.join("~")
    }

    /// Decodes a token; `None` when it is not one Tally made.
    pub fn decode(s: &str) -> Option<Self> {
        let mut stream = None;
        let mut positions = Vec::new();
        for part in s.split('~') {
            let mut fields = part.split('.');
            let (Some("t1"), Some(name), Some(p), Some(o), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return None;
            };
            if name.is_empty() || stream.get_or_insert(name) != &name {
                return None;
            }
            let partition = p.parse().ok().filter(|p: &i32| *p >= 0)?;
            let offset = o.parse().ok().filter(|o: &i64| *o >= 0)?;
            positions.push(Position { partition, offset });
        }
        Some(Self {
            stream: stream?.to_string(),
            positions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let token = ConsistencyToken {
            stream: "order".into(),
            positions: vec![Position {
                partition: 3,
                offset: 41,
            }],
        };
        let s = token.encode();
        assert_eq!(ConsistencyToken::decode(&s), Some(token));
        for bad in [
            "",
            "t1.order.3",
            "t2.order.1.1",
            "t1.order.-1.4",
            "t1.order.1.x",
            "t1..1.1",
        ] {
            assert_eq!(ConsistencyToken::decode(bad), None, "{bad}");
        }
    }
}
