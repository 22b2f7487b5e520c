//! The README's first lines are promises: the main command and the test command. CI must run
//! exactly the test command the README gives.

use llamarec_tests::repo_root;

fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let block = readme.split("```bash\n").nth(1).and_then(|b| b.split("```").next()).expect("a bash block near the top of the README");
    block.lines().map(|l| l.split('#').next().unwrap_or("").trim().to_string()).filter(|l| !l.is_empty()).collect()
}

#[test]
fn readme_starts_with_the_main_and_the_test_command() {
    let commands = readme_commands();
    assert_eq!(commands.len(), 2, "expected exactly two commands, found {commands:?}");
    assert!(commands[1].contains("cargo test"), "second command runs the tests: {}", commands[1]);
}

#[test]
fn ci_runs_the_readme_test_command_verbatim() {
    let test_command = readme_commands().remove(1);
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).expect(".ci/run");
    assert!(ci.lines().any(|l| l.trim() == test_command), ".ci/run does not run {test_command:?}");
}
