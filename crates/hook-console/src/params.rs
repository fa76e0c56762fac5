//! Query strings and form bodies: parsed by hand (`form_urlencoded`) so that repeated keys
//! (`id=..&id=..`) work, turned into hook-store's filter, and back into links.

use hook_store::console::{Cursor, EventFilter, EventState, PageAt};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::ConsoleError;
use crate::text;

/// The pairs of a query string or an `application/x-www-form-urlencoded` body.
#[derive(Debug, Clone, Default)]
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub(crate) fn parse(input: &[u8]) -> Params {
        Params(form_urlencoded::parse(input).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
    }

    pub(crate) fn from_query(query: Option<&str>) -> Params {
        Params::parse(query.unwrap_or("").as_bytes())
    }

    /// The first non-empty value of `key`, trimmed.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v.trim()).find(|v| !v.is_empty())
    }

    /// Every value of `key`.
    pub(crate) fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A query string of `pairs` (empty values left out), with the leading `?` when not empty.
pub(crate) fn query(pairs: &[(&str, String)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        if !value.is_empty() {
            serializer.append_pair(key, value);
        }
    }
    let encoded = serializer.finish();
    if encoded.is_empty() {
        encoded
    } else {
        format!("?{encoded}")
    }
}

/// `cursor` as `<microseconds since the epoch>_<uuid>`.
pub(crate) fn cursor_text(cursor: Cursor) -> String {
    format!("{}_{}", cursor.created_at.unix_timestamp_nanos() / 1000, cursor.id)
}

pub(crate) fn parse_cursor(text: &str) -> Result<Cursor, ConsoleError> {
    let bad = || ConsoleError::BadRequest("malformed page position".into());
    let (micros, id) = text.split_once('_').ok_or_else(bad)?;
    let micros: i128 = micros.parse().map_err(|_| bad())?;
    let created_at = OffsetDateTime::from_unix_timestamp_nanos(micros * 1000).map_err(|_| bad())?;
    Ok(Cursor { created_at, id: Uuid::parse_str(id).map_err(|_| bad())? })
}

/// The events filter of a request, as typed (for the form and links) and as parsed.
#[derive(Debug, Clone, Default)]
pub(crate) struct FilterForm {
    pub(crate) state: String,
    pub(crate) source: String,
    pub(crate) action: String,
    pub(crate) since: String,
    pub(crate) until: String,
    pub(crate) session: String,
    pub(crate) q: String,
}

/// The filter's keys, in the order links carry them.
pub(crate) const FILTER_KEYS: [&str; 7] = ["state", "source", "action", "since", "until", "session", "q"];

impl FilterForm {
    pub(crate) fn from_params(params: &Params) -> FilterForm {
        let get = |key: &str| params.get(key).unwrap_or("").to_owned();
        FilterForm {
            state: get("state"),
            source: get("source"),
            action: get("action"),
            since: get("since"),
            until: get("until"),
            session: get("session"),
            q: get("q"),
        }
    }

    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let values =
            [&self.state, &self.source, &self.action, &self.since, &self.until, &self.session, &self.q];
        FILTER_KEYS.iter().zip(values).map(|(k, v)| (*k, v.clone())).collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pairs().iter().all(|(_, v)| v.is_empty())
    }

    /// The filter for hook-store; a malformed state or time is a bad request.
    pub(crate) fn filter(&self) -> Result<EventFilter, ConsoleError> {
        let some = |s: &String| (!s.is_empty()).then(|| s.clone());
        let time = |s: &String, what: &str| -> Result<Option<OffsetDateTime>, ConsoleError> {
            if s.is_empty() {
                return Ok(None);
            }
            text::parse_time(s).map(Some).ok_or_else(|| {
                ConsoleError::BadRequest(format!(
                    "{what}: not a time (use 2024-05-01T12:34, taken as UTC, or RFC 3339)"
                ))
            })
        };
        let state = match self.state.as_str() {
            "" => None,
            name => Some(EventState::from_name(name).ok_or_else(|| {
                ConsoleError::BadRequest("state: one of pending, retrying, dead, processed, failed".into())
            })?),
        };
        Ok(EventFilter {
            state,
            source: some(&self.source),
            action: some(&self.action),
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
            session: some(&self.session),
            error_text: some(&self.q),
        })
    }
}

/// The page asked for by `before` / `after`.
pub(crate) fn page_at(params: &Params) -> Result<PageAt, ConsoleError> {
    if let Some(before) = params.get("before") {
        return Ok(PageAt::Before(parse_cursor(before)?));
    }
    if let Some(after) = params.get("after") {
        return Ok(PageAt::After(parse_cursor(after)?));
    }
    Ok(PageAt::Newest)
}

/// The event ids of a form (`id`), at most `max`.
pub(crate) fn ids(params: &Params, max: usize) -> Result<Vec<Uuid>, ConsoleError> {
    let ids: Vec<Uuid> = params
        .all("id")
        .map(|v| Uuid::parse_str(v.trim()).map_err(|_| ConsoleError::BadRequest("malformed event id".into())))
        .collect::<Result<_, _>>()?;
    if ids.len() > max {
        return Err(ConsoleError::BadRequest(format!(
            "at most {max} events can be selected at once; replay by filter instead"
        )));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_and_links() {
        let params = Params::parse(b"id=a&id=b&state=dead&source=%3Cx%3E&q=");
        assert_eq!(params.all("id").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(params.get("q"), None);
        let form = FilterForm::from_params(&params);
        assert_eq!(query(&form.pairs()), "?state=dead&source=%3Cx%3E");
        assert_eq!(form.filter().unwrap().state, Some(EventState::Dead));
        assert!(FilterForm { state: "nope".into(), ..FilterForm::default() }.filter().is_err());
        assert!(FilterForm { since: "soon".into(), ..FilterForm::default() }.filter().is_err());
    }

    #[test]
    fn cursors_round_trip() {
        let cursor = Cursor {
            created_at: OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000).unwrap(),
            id: Uuid::nil(),
        };
        assert_eq!(parse_cursor(&cursor_text(cursor)).unwrap(), cursor);
        assert!(parse_cursor("12_x").is_err());
        assert!(parse_cursor("nope").is_err());
    }
}
