//! The Dockerfile and the Docker build context.

use super::*;

/// Dockerfile instructions, one per entry, with continuation lines joined and comments dropped.
fn dockerfile_instructions() -> Vec<String> {
    let text = read(&repo().join("deploy/Dockerfile"));
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        instructions.push(current);
    }
    instructions
}

fn keyword(instruction: &str) -> String {
    instruction
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_as_non_root_in_another() {
    let instructions = dockerfile_instructions();
    let mut stages: Vec<Vec<String>> = Vec::new();
    for instruction in instructions {
        if keyword(&instruction) == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
    }
    assert!(stages.len() >= 2, "a build stage and a runtime stage");

    let build = stages[0].join("\n");
    assert!(build.contains("rust:1-bookworm"), "the official Rust image");
    assert!(
        build.contains("cargo build --release --locked --bin ecommerce"),
        "a locked release build of the server"
    );
    // build.rs compiles proto/, sqlx::migrate! embeds migrations/.
    for input in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "proto",
        "migrations",
        "src",
    ] {
        assert!(
            stages[0]
                .iter()
                .any(|instruction| keyword(instruction) == "COPY"
                    && instruction.split_whitespace().any(|word| word == input)),
            "the build stage does not copy {input}"
        );
    }

    let runtime = stages.last().expect("a runtime stage");
    for instruction in runtime {
        let words: Vec<&str> = instruction
            .split(|c: char| c.is_whitespace() || "/\"'[],;&|".contains(c))
            .collect();
        assert!(
            !words.contains(&"cargo") && !words.contains(&"rustc"),
            "the runtime stage must not build: {instruction}"
        );
    }
    let user = runtime
        .iter()
        .rfind(|instruction| keyword(instruction) == "USER")
        .expect("the runtime stage sets USER");
    let uid = user.split_whitespace().nth(1).expect("USER names a user");
    let uid = uid.split(':').next().expect("a uid");
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "USER must be a numeric non-root uid (runAsNonRoot cannot check a name): {user}"
    );
    assert!(
        runtime
            .iter()
            .any(|i| keyword(i) == "EXPOSE" && i.split_whitespace().any(|p| p == "50051")),
        "the runtime stage exposes the gRPC port"
    );
    assert!(
        runtime
            .iter()
            .any(|i| i == r#"ENTRYPOINT ["/usr/local/bin/ecommerce"]"#),
        "the runtime stage runs the server"
    );
}

#[test]
fn the_docker_context_leaves_out_build_output_and_history() {
    let ignore = read(&repo().join(".dockerignore"));
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    for excluded in ["target/", ".git"] {
        assert!(
            patterns.contains(&excluded),
            ".dockerignore lacks {excluded}"
        );
    }
    for needed in [
        "src",
        "proto",
        "migrations",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
    ] {
        assert!(
            !patterns.iter().any(|p| p.trim_end_matches('/') == needed),
            ".dockerignore excludes {needed}, which the build needs"
        );
    }
}
