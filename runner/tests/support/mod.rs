pub mod testops;
