//! JSON merge patches (RFC 7396): applying one, and the one that turns a
//! value into another. Spec versions record the second, so that each
//! version says what changed in the form a `PATCH` takes.

use serde_json::{Map, Value};

/// Applies `patch` to `target` (RFC 7396 section 2).
pub fn apply(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    apply(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// The merge patch that turns `from` into `to`: `apply(from, diff(from,
/// to)) == to` for any two objects whose values hold no `null` (a merge
/// patch cannot set a field to `null`; specs leave absent fields out).
pub fn diff(from: &Value, to: &Value) -> Value {
    match (from, to) {
        (Value::Object(f), Value::Object(t)) => {
            let mut out = Map::new();
            for k in f.keys().filter(|k| !t.contains_key(*k)) {
                out.insert(k.clone(), Value::Null);
            }
            for (k, tv) in t {
                match f.get(k) {
                    Some(fv) if fv == tv => {}
                    Some(fv @ Value::Object(_)) if tv.is_object() => {
                        out.insert(k.clone(), diff(fv, tv));
                    }
                    _ => {
                        out.insert(k.clone(), tv.clone());
                    }
                }
            }
            Value::Object(out)
        }
        _ => to.clone(),
    }
}

/// A top-level field that differs between two objects, with its value in
/// each (`None` where it is absent).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldChange {
    pub field: String,
    pub from: Option<Value>,
    pub to: Option<Value>,
}

/// The top-level fields of two objects that differ, in field order, and
/// the merge patch from one to the other ([`diff`]).
pub fn field_changes(from: &Value, to: &Value) -> (Vec<FieldChange>, Value) {
    let patch = diff(from, to);
    let changes = match &patch {
        Value::Object(fields) => fields
            .keys()
            .map(|k| FieldChange { field: k.clone(), from: from.get(k).cloned(), to: to.get(k).cloned() })
            .collect(),
        _ => Vec::new(),
    };
    (changes, patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apply_follows_rfc7396() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}});
        apply(&mut v, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        assert_eq!(v, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
    }

    #[test]
    fn diff_names_only_what_changed() {
        let from = json!({"image": "web", "count": 3, "tags": {"team": "a", "cost": "x"}, "join": "l"});
        let to = json!({"image": "web", "count": 5, "tags": {"team": "b", "cost": "x"}, "env": "qa"});
        let d = diff(&from, &to);
        assert_eq!(d, json!({"count": 5, "tags": {"team": "b"}, "join": null, "env": "qa"}));
        assert_eq!(diff(&to, &to), json!({}));
    }

    #[test]
    fn field_changes_name_each_top_level_field_once() {
        let from = json!({"image": "web", "tags": {"team": "a", "cost": "x"}, "join": "l"});
        let to = json!({"image": "web", "tags": {"team": "b", "cost": "x"}, "env": "qa"});
        let (changes, patch) = field_changes(&from, &to);
        assert_eq!(patch, diff(&from, &to));
        let named: Vec<_> = changes.iter().map(|c| (c.field.as_str(), c.from.clone(), c.to.clone())).collect();
        assert_eq!(
            named,
            [
                ("env", None, Some(json!("qa"))),
                ("join", Some(json!("l")), None),
                ("tags", Some(json!({"team": "a", "cost": "x"})), Some(json!({"team": "b", "cost": "x"}))),
            ]
        );
    }

    #[test]
    fn diff_then_apply_is_the_identity() {
        let cases = [
            (json!({}), json!({"a": [1, 2], "b": {"c": {"d": 1}}})),
            (json!({"a": {"b": 1}}), json!({"a": 2})),
            (json!({"a": 2}), json!({"a": {"b": 1}})),
            (json!({"a": [1], "b": "x"}), json!({"a": [2]})),
            (json!({"a": {"b": 1, "c": 2}}), json!({"a": {}})),
        ];
        for (from, to) in cases {
            let mut v = from.clone();
            apply(&mut v, &diff(&from, &to));
            assert_eq!(v, to, "from {from} to {to}");
        }
    }
}
