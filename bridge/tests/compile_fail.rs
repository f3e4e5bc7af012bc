//! Misuses that the types refuse: each file under `tests/compile-fail/` must fail to compile,
//! with the error recorded beside it (`TRYBUILD=overwrite` rewrites the records after a
//! deliberate change).

#[test]
fn misuses_do_not_compile() {
    trybuild::TestCases::new().compile_fail("tests/compile-fail/*.rs");
}
