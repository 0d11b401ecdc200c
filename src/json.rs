//! serde helpers for the JSON files we write and read back (serde_json
//! writes NaN and the infinities as `null`).

/// Deserialises an `f64` written by serde_json, which writes NaN and the
/// infinities as `null`: `null` reads back as NaN.
pub fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// [`null_as_nan`] for a list of numbers.
pub fn nulls_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    use serde::Deserialize;
    Ok(Vec::<Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}
