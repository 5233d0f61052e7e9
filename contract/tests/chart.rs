//! The chart says what the contract says: its defaults, its values schema's name patterns and its
//! helpers are compared with `nvidia_contract::chart::owned_values`.

use std::path::{Path, PathBuf};

use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `a.b.c` in a YAML or JSON document.
fn at<'a>(document: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(document, |value, key| &value[key])
}

fn owned(section: &str) -> serde_json::Map<String, Value> {
    let owned = nvidia_contract::chart::owned_values();
    owned[section].as_object().cloned().unwrap_or_else(|| panic!("owned values have no {section}"))
}

#[test]
fn values_yaml_defaults_are_the_contracts() {
    let values: Value = serde_yaml_ng::from_str(&read(&chart().join("values.yaml"))).expect("values.yaml parses");
    let owned = owned("values");
    assert!(!owned.is_empty());
    for (path, want) in owned {
        assert_eq!(at(&values, &path), &want, "values.yaml {path}");
    }
}

#[test]
fn values_schema_checks_names_with_the_contracts_rule() {
    let schema: Value =
        serde_json::from_str(&read(&chart().join("values.schema.json"))).expect("values.schema.json parses");
    let owned = owned("schema");
    assert!(!owned.is_empty());
    for (path, want) in owned {
        let property = path.split('.').fold(&schema, |value, key| &value["properties"][key]);
        assert_eq!(&property["pattern"], &want, "values.schema.json {path}");
    }
}

#[test]
fn helpers_render_the_contracts_paths() {
    let helpers = read(&chart().join("templates/_helpers.tpl"));
    let owned = owned("helpers");
    assert!(!owned.is_empty());
    for (name, want) in owned {
        let opening = format!("{{{{- define \"{name}\" -}}}}");
        let body = helpers
            .split_once(&opening)
            .and_then(|(_, rest)| rest.split_once("{{- end"))
            .map(|(body, _)| body.trim())
            .unwrap_or_else(|| panic!("_helpers.tpl defines no {name}"));
        assert_eq!(Some(body), want.as_str(), "_helpers.tpl {name}");
    }
}
