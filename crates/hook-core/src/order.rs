//! Session order: which events are attempted one at a time per session, in `created_at` order.
//!
//! Plain data. A routes file (crate hook-sinks) says which `(source, action)` routes are
//! ordered; the store (crate hook-store) turns the rules into its claim: an event of an ordered
//! route is claimable only while no earlier event of its session (by `created_at`, then `id`) is
//! still pending (unprocessed and not dead: waiting for a retry, or held by any claim). The
//! session is the store's to define (hook-store: `metadata.session_id`, else
//! `payload.session_id`); an event without one is never held back. See docs/routes.md.

use crate::handler::WILDCARD;

/// One rule: the events this `(source, action)` pattern matches are ordered, or not. Patterns
/// match as the [`HandlerRegistry`](crate::HandlerRegistry) does: exact, then `(source, *)`,
/// then `(*, *)`; the most specific rule that matches decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRule {
    /// The source, or `*`.
    pub source: String,
    /// The action, or `*`.
    pub action: String,
    /// Whether the events it matches are attempted in session order.
    pub ordered: bool,
}

/// The rules of session order; empty (the default): nothing is ordered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOrder {
    /// The rules, in any order (precedence is by specificity, see [`OrderRule`]).
    pub rules: Vec<OrderRule>,
}

impl SessionOrder {
    /// Whether some events are ordered. When not, a store claims exactly as it would without
    /// the feature.
    pub fn is_on(&self) -> bool {
        self.rules.iter().any(|r| r.ordered)
    }

    /// Whether events of `(source, action)` are ordered: the most specific matching rule's
    /// word (exact, then `(source, *)`, then `(*, *)`), or not ordered when none matches.
    pub fn ordered(&self, source: &str, action: &str) -> bool {
        let rule = |s: &str, a: &str| self.rules.iter().find(|r| r.source == s && r.action == a);
        rule(source, action)
            .or_else(|| rule(source, WILDCARD))
            .or_else(|| rule(WILDCARD, WILDCARD))
            .is_some_and(|r| r.ordered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(source: &str, action: &str, ordered: bool) -> OrderRule {
        OrderRule { source: source.into(), action: action.into(), ordered }
    }

    #[test]
    fn the_most_specific_rule_decides() {
        let order = SessionOrder {
            rules: vec![rule("*", "*", true), rule("Stop", "*", false), rule("Stop", "x", true)],
        };
        assert!(order.is_on());
        let check = |s: &str, a: &str| order.ordered(s, a);
        assert!(check("PreToolUse", "tool_invocation"));
        assert!(!check("Stop", "response_completed"));
        assert!(check("Stop", "x"));
        assert!(!SessionOrder::default().is_on());
        assert!(!SessionOrder::default().ordered("a", "b"));
        let off = SessionOrder { rules: vec![rule("Stop", "*", false)] };
        assert!(!off.is_on());
    }
}
