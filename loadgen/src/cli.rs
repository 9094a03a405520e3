//! The command line of `ecommerce-loadgen`: options onto [`Options`], subcommands onto
//! [`Scenario`], the report onto stdout, and the verdict onto the exit code (0 when every
//! invariant holds, 1 when one is broken, 2 when the run could not happen).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, builder::TypedValueParser};
use sqlx::postgres::PgConnectOptions;

use super::{Listing, Mixed, Options, Report, Scenario, Tls, Weights, run};

#[derive(Debug, Parser)]
#[command(
    name = "ecommerce-loadgen",
    version,
    about = "Load-tests an ecommerce deployment and checks its invariants afterwards",
    long_about = "Load-tests an ecommerce deployment and checks its invariants afterwards.\n\n\
        Each scenario creates its own fixtures through the Admin RPCs and funds its buyers \
        through ChargeBalance, so it works against any deployment. Exit code: 0 when every \
        invariant holds, 1 when one is violated, 2 when the run could not happen.\n\n\
        Per-user rate limits: a server with USER_RATE_PER_SEC and USER_RATE_BURST set refuses \
        IssueCoupon, PlaceOrder, Checkout, Pay and ChargeBalance calls past a user's budget with \
        RESOURCE_EXHAUSTED (RATE_LIMITED); they are counted as refusals and break no invariant. \
        To measure throughput rather than the limit, spread the calls over more --buyers or \
        --users, or raise the limit."
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// Server address; https:// implies --tls.
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Connect with TLS.
    #[arg(long, global = true)]
    tls: bool,
    /// PEM file of the CA that signed the server's certificate (implies --tls).
    #[arg(long, global = true, value_name = "PEM")]
    ca_cert: Option<PathBuf>,
    /// Name to verify the server's certificate against (implies --tls).
    #[arg(long, global = true)]
    domain: Option<String>,
    /// Sent as `authorization: Bearer <token>` on AdminService calls only.
    #[arg(long, global = true, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Calls in flight (one per worker).
    #[arg(long, global = true, default_value_t = Options::DEFAULT_CONCURRENCY,
          value_parser = clap::value_parser!(u32).range(1..=10_000).map(|v| v as usize))]
    concurrency: usize,
    /// Stop after this many units of work (one IssueCoupon, one PlaceOrder with its Pay, ...).
    #[arg(long, global = true)]
    requests: Option<u64>,
    /// Stop this long after the warm-up, e.g. 10s or 2m.
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Calls started this early are made but not measured, e.g. 2s.
    #[arg(long, global = true, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Seed of every random choice and of the block of user ids; random when not given.
    #[arg(long, global = true)]
    seed: Option<u64>,
    /// HTTP/2 connections [default: concurrency / 32, rounded up].
    #[arg(long, global = true,
          value_parser = clap::value_parser!(u32).range(1..=10_000).map(|v| v as usize))]
    connections: Option<usize>,
    /// Deadline of each call.
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print one JSON object instead of the table.
    #[arg(long, global = true)]
    json: bool,
    /// Also write the report as one self-contained HTML page with plots (inline SVG).
    #[arg(long, global = true, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// Also write each plot of the HTML report as an SVG file in this folder.
    #[arg(long, global = true, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, global = true)]
    no_progress: bool,
    /// Postgres of the deployment, for invariants no RPC shows (read-only queries).
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Distinct users ask once each for one coupon with limited stock.
    CouponStampede {
        #[arg(long, default_value_t = 10_000)]
        users: u64,
        #[arg(long, default_value_t = 1_000)]
        stock: i64,
    },
    /// Buyers order one unit of one product and pay it, until it sells out and beyond
    /// (by default stock + max(stock/5, 100) orders).
    HotProduct(ProductArgs),
    /// Pay alone: --orders one-unit orders, round-robin over --buyers each funded for their
    /// share, are placed during the set-up (untimed); the run pays each once without a key
    /// (by default all of them), like pgbench's naive payment of ready-made orders
    /// (bench/naive_pay.sql). Checks one payment per order, PAID only when paid, and balances
    /// against payments (and, with --database-url, payments rows and ledgers in Postgres).
    PayOnly {
        #[arg(long, default_value_t = 20_000)]
        orders: u64,
        /// As many balances as the naive payment's bench/naive_schema.sql has.
        #[arg(long, default_value_t = 10_000)]
        buyers: u64,
    },
    /// GetPopularProducts reads.
    Popular(PopularArgs),
    /// Small charges to random users, some repeating an idempotency key on purpose.
    Charge {
        #[arg(long, default_value_t = 1_000)]
        users: u64,
    },
    /// Buyers put 1..=3 units of one product in their cart and check it out with a fresh
    /// idempotency key (one in ten checkouts is sent again with the same key and must return
    /// the same order), until the product sells out and beyond (by default
    /// stock/2 + max(stock/10, 100) checkouts). Checks stock conservation and one order per key.
    Cart(ProductArgs),
    /// Health checks (grpc.health.v1.Health/Check of the whole server): the cheapest call the
    /// server answers, the floor other paths' cost is measured against.
    Health,
    /// Holders ask again: `holders` users are issued the coupon during set-up (with as many
    /// seats to spare), then random holders ask for it again (double clicks, impatient
    /// retries); every answer must be ALREADY_EXISTS/COUPON_ALREADY_ISSUED naming the holder's
    /// own coupon, and no seat may be taken. Use --warmup to leave out the first seconds, while
    /// the server may still be settling the holders' rows.
    CouponRepeat {
        #[arg(long, default_value_t = 1_000)]
        holders: u64,
    },
    /// A weighted blend of the other scenarios on shared fixtures; the buyers are also the
    /// users charged (weights: coupon, order, pay, popular, charge, checkout).
    Mixed {
        #[arg(long, default_value = "coupon=10,order=30,pay=30,popular=20,charge=10")]
        weights: Weights,
        #[arg(long, default_value_t = 1_000)]
        coupon_stock: i64,
        #[command(flatten)]
        product: ProductArgs,
        #[command(flatten)]
        popular: PopularArgs,
    },
    /// Walks one buyer's order history with ListOrders, page by page, as a "My orders" page
    /// does (half the walks read the first page only, some go hundreds of pages deep; 30% use a
    /// status filter). The buyer must already have --min-orders orders: scripts/seed-orders
    /// writes them (checked with --database-url). Checks every page: the buyer's orders only,
    /// newest first, none twice, in the filter's statuses.
    ListOrders {
        #[arg(long, default_value_t = Listing::DEFAULT_USER)]
        user_id: i64,
        #[arg(long, default_value_t = Listing::DEFAULT_ORDERS)]
        min_orders: u64,
        #[arg(long, default_value_t = 20)]
        page_size: i32,
    },
    /// Orders live their whole life: each unit of work places an order of one or two products
    /// (1..=3 units a line) with a key, then cancels it (15%), leaves it open (10%) or pays it
    /// (75%); a paid order is refunded (AdminService/RefundOrder, keyed, restocking or not) in
    /// part, in full, in part then the rest, or not at all, one refund in five sent again with
    /// its key; then the buyer's first ListOrders page must show it as left. Needs
    /// --admin-token and --database-url: checks in Postgres that each balance equals its
    /// charges minus its payments plus its refunds, stock is conserved, refunds stay within what
    /// each order and line paid, and each transition wrote exactly one outbox event, numbered
    /// 1..n per order.
    Lifecycle(LifecycleArgs),
}

#[derive(Debug, Args)]
struct LifecycleArgs {
    /// Units of each of the two products.
    #[arg(long, default_value_t = 1_000_000)]
    stock: i64,
    #[arg(long, default_value_t = 1_000)]
    buyers: u64,
}

#[derive(Debug, Args)]
struct ProductArgs {
    #[arg(long, default_value_t = 100_000)]
    stock: i64,
    #[arg(long, default_value_t = 1_000)]
    buyers: u64,
    /// Orders each buyer is funded for [default: 2 x stock / buyers + 1].
    #[arg(long)]
    orders_per_buyer: Option<u64>,
}

#[derive(Debug, Args)]
struct PopularArgs {
    #[arg(long, default_value_t = 3)]
    days: i32,
    #[arg(long, default_value_t = 5)]
    limit: i32,
}

impl Command {
    fn scenario(self) -> Scenario {
        match self {
            Command::CouponStampede { users, stock } => Scenario::CouponStampede { users, stock },
            Command::HotProduct(p) => Scenario::HotProduct {
                stock: p.stock,
                buyers: p.buyers,
                orders_per_buyer: p.orders_per_buyer,
            },
            Command::PayOnly { orders, buyers } => Scenario::PayOnly { orders, buyers },
            Command::Popular(p) => Scenario::Popular {
                days: p.days,
                limit: p.limit,
            },
            Command::Charge { users } => Scenario::Charge { users },
            Command::Health => Scenario::Health,
            Command::CouponRepeat { holders } => Scenario::CouponRepeat { holders },
            Command::Cart(p) => Scenario::Cart {
                stock: p.stock,
                buyers: p.buyers,
                orders_per_buyer: p.orders_per_buyer,
            },
            Command::Mixed {
                weights,
                coupon_stock,
                product,
                popular,
            } => Scenario::Mixed(Mixed {
                weights,
                coupon_stock,
                stock: product.stock,
                buyers: product.buyers,
                orders_per_buyer: product.orders_per_buyer,
                days: popular.days,
                limit: popular.limit,
            }),
            Command::Lifecycle(l) => Scenario::Lifecycle {
                stock: l.stock,
                buyers: l.buyers,
            },
            Command::ListOrders {
                user_id,
                min_orders,
                page_size,
            } => Scenario::ListOrders(Listing {
                user_id,
                min_orders,
                page_size,
            }),
        }
    }
}

impl Global {
    fn options(self) -> anyhow::Result<Options> {
        let ca_cert_pem = match &self.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("cannot read --ca-cert {}", path.display()))?,
            ),
            None => None,
        };
        let tls = (self.tls || ca_cert_pem.is_some() || self.domain.is_some()).then_some(Tls {
            ca_cert_pem,
            domain: self.domain,
        });
        let database = match &self.database_url {
            Some(url) => Some(
                url.parse::<PgConnectOptions>()
                    .context("invalid --database-url")?,
            ),
            None => None,
        };
        Ok(Options {
            target: self.target,
            tls,
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
            concurrency: self.concurrency,
            connections: self.connections,
            requests: self.requests,
            duration: self.duration,
            warmup: self.warmup,
            seed: self.seed.unwrap_or_else(rand::random),
            timeout: self.timeout,
            progress: !self.no_progress && !self.json,
            database,
        })
    }
}

/// Parses the command line, runs, prints, and turns the verdict into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.global.json;
    let (html_path, plots_dir) = (cli.global.report.clone(), cli.global.plots.clone());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        let options = cli.global.options()?;
        run(&options, &cli.command.scenario()).await
    });
    match result {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: cannot write the report: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{}", report.to_table());
            }
            if let Err(e) = write_files(&report, html_path.as_deref(), plots_dir.as_deref()) {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
            if report.passed {
                ExitCode::SUCCESS
            } else {
                for check in report.violations() {
                    eprintln!("invariant violated: {}: {}", check.name, check.detail);
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The HTML page and the SVG plots, where asked for.
fn write_files(report: &Report, html: Option<&Path>, plots: Option<&Path>) -> anyhow::Result<()> {
    if let Some(path) = html {
        std::fs::write(path, super::html::page(report))
            .with_context(|| format!("cannot write --report {}", path.display()))?;
    }
    if let Some(dir) = plots {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --plots {}", dir.display()))?;
        for plot in super::html::plots(report) {
            let path = dir.join(format!("{}.svg", plot.name));
            std::fs::write(&path, plot.svg)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ecommerce-loadgen").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn global_options_may_follow_the_subcommand() {
        let cli = parse(&[
            "--target",
            "http://127.0.0.1:50071",
            "--admin-token",
            "t",
            "coupon-stampede",
            "--users",
            "10000",
            "--stock",
            "1000",
            "--concurrency",
            "256",
        ]);
        assert_eq!(cli.global.concurrency, 256);
        let options = cli.global.options().unwrap();
        assert_eq!(options.connections(), 8);
        assert_eq!(options.admin_token.as_deref(), Some("t"));
        assert!(options.tls.is_none());
        assert!(options.progress);
        assert_eq!(
            cli.command.scenario(),
            Scenario::CouponStampede {
                users: 10_000,
                stock: 1_000
            }
        );
    }

    #[test]
    fn defaults_and_durations() {
        let cli = parse(&[
            "--duration",
            "1m",
            "--warmup",
            "2s",
            "--seed",
            "9",
            "--json",
            "mixed",
        ]);
        let options = cli.global.options().unwrap();
        assert_eq!(options.target, "http://127.0.0.1:50051");
        assert_eq!(options.concurrency, 64);
        assert_eq!(options.connections(), 2);
        assert_eq!(options.duration, Some(Duration::from_secs(60)));
        assert_eq!(options.warmup, Duration::from_secs(2));
        assert_eq!(options.seed, 9);
        assert!(!options.progress, "--json hides the progress bar");
        assert_eq!(cli.command.scenario(), Scenario::Mixed(Mixed::default()));
    }

    #[test]
    fn the_floor_and_the_repeat_holders_parse() {
        assert_eq!(parse(&["health"]).command.scenario(), Scenario::Health);
        assert_eq!(
            parse(&["--warmup", "2s", "coupon-repeat", "--holders", "50"])
                .command
                .scenario(),
            Scenario::CouponRepeat { holders: 50 }
        );
        assert_eq!(
            parse(&["coupon-repeat"]).command.scenario(),
            Scenario::CouponRepeat { holders: 1_000 }
        );
    }

    #[test]
    fn the_lifecycle_parses_with_its_defaults() {
        assert_eq!(
            parse(&["lifecycle"]).command.scenario(),
            Scenario::Lifecycle {
                stock: 1_000_000,
                buyers: 1_000
            }
        );
        assert_eq!(
            parse(&["lifecycle", "--stock", "50", "--buyers", "4"])
                .command
                .scenario(),
            Scenario::Lifecycle {
                stock: 50,
                buyers: 4
            }
        );
    }

    #[test]
    fn pay_only_defaults_to_the_naive_payments_buyers() {
        let scenario = |a: &[&str]| parse(a).command.scenario();
        let expected = |orders, buyers| Scenario::PayOnly { orders, buyers };
        assert_eq!(scenario(&["pay-only"]), expected(20_000, 10_000));
        let args = ["pay-only", "--orders", "60", "--buyers", "7"];
        assert_eq!(scenario(&args), expected(60, 7));
    }

    #[test]
    fn a_domain_implies_tls_and_bad_values_are_refused() {
        let options = parse(&["--domain", "shop.example", "popular"])
            .global
            .options()
            .unwrap();
        assert_eq!(
            options.tls.and_then(|t| t.domain).as_deref(),
            Some("shop.example")
        );
        let args = |a: &[&str]| {
            Cli::try_parse_from(std::iter::once("ecommerce-loadgen").chain(a.iter().copied()))
        };
        assert!(args(&["--concurrency", "0", "popular"]).is_err());
        assert!(args(&["mixed", "--weights", "coupon=x"]).is_err());
        assert!(args(&["--duration", "soon", "charge"]).is_err());
        assert!(
            parse(&["--ca-cert", "/nonexistent.pem", "charge"])
                .global
                .options()
                .is_err()
        );
    }
}
