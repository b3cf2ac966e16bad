//! Unit tests of the job helpers.

use super::*;

#[tokio::test]
async fn output_is_capped_across_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    let mut file = tokio::fs::File::create(&path).await.unwrap();
    let mut written = 0;
    write_capped(&mut file, b"hello ", 8, &mut written)
        .await
        .unwrap();
    write_capped(&mut file, b"world", 8, &mut written)
        .await
        .unwrap();
    // Past the cap nothing more is kept, and that is no error.
    write_capped(&mut file, b"!", 8, &mut written)
        .await
        .unwrap();
    file.flush().await.unwrap();
    assert_eq!(written, 8);
    assert_eq!(std::fs::read(&path).unwrap(), b"hello wo");
}
